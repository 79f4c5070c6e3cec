"""lepton_mm.data.batching: the BatchSource contract of ArrayDataset and BucketedDataset."""

import numpy as np
import pytest

from lepton_mm.data import ArrayDataset, BatchSource, BucketedDataset, epoch_permutation

T = 24
BOUNDS = (4, 8, 16, 24)


def sequences(n=29, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, T + 1, n)
    mask = np.arange(T)[None] < lengths[:, None]
    ids = np.where(mask, rng.integers(1, 50, (n, T)), 0).astype(np.int32)
    arrays = {"text": (ids, mask), "image": rng.normal(size=(n, 3)).astype(np.float32),
              "score": rng.normal(size=n).astype(np.float32),  # no time axis
              "label": np.arange(n, dtype=np.int32)}  # label = example index
    return arrays, lengths


def bucketed(n=29, seed=0, bounds=BOUNDS):
    arrays, lengths = sequences(n, seed)
    return BucketedDataset(arrays, {"text": lengths}, bucket_bounds=bounds), lengths


def bound_of(length):
    return next(b for b in BOUNDS if b >= length)


def check_contract(source, batch_size, seed, epoch, shuffle=True):
    """The BatchSource contract; returns the epoch's batches."""
    batches = list(source.batches(batch_size, seed=seed, epoch=epoch, shuffle=shuffle))
    assert len(batches) == source.num_batches(batch_size)
    seen = []
    for batch in batches:
        assert batch["valid"].dtype == bool and batch["valid"].shape == (batch_size,)
        assert batch["label"].shape == (batch_size,)
        seen += batch["label"][batch["valid"]].tolist()
    assert sorted(seen) == list(range(len(source)))  # every example once
    return batches


def test_both_sources_satisfy_the_protocol():
    arrays, _ = sequences()
    for source in (ArrayDataset(arrays), bucketed()[0]):
        assert isinstance(source, BatchSource)
        for batch_size in (1, 4, 7, 64):
            check_contract(source, batch_size, seed=3, epoch=1)
            check_contract(source, batch_size, seed=3, epoch=1, shuffle=False)
    assert not isinstance(arrays, BatchSource)  # a dict is not a source (fit wraps it)


def test_bucketed_batches_stay_in_one_bucket_cut_to_its_bound():
    source, lengths = bucketed()
    for batch in check_contract(source, 4, seed=0, epoch=0):
        ids, mask = batch["text"]
        rows = batch["label"]  # example indices, padding rows included
        bounds = {bound_of(n) for n in lengths[rows]}
        assert len(bounds) == 1, "a batch mixes length buckets"
        (bound,) = bounds
        assert ids.shape == mask.shape == (4, bound)
        np.testing.assert_array_equal(mask.sum(1), lengths[rows])  # nothing cut off
        full_ids, _ = source.arrays["text"]
        np.testing.assert_array_equal(ids, full_ids[rows, :bound])
        assert batch["image"].shape == (4, 3)  # other modalities keep their shape
    assert source.num_buckets() == len({bound_of(n) for n in lengths})


def test_bucketed_epochs_are_a_function_of_seed_and_epoch():
    source, _ = bucketed()

    def order(seed, epoch, start=0):
        return [b["label"].tolist() for b in source.batches(5, seed=seed, epoch=epoch,
                                                            start=start)]

    assert order(1, 2) == order(1, 2)
    assert order(1, 2) != order(1, 3) and order(1, 2) != order(2, 2)
    assert order(1, 2, start=3) == order(1, 2)[3:]  # resuming mid-epoch
    plain = [b["label"][b["valid"]].tolist()
             for b in source.batches(5, seed=1, epoch=2, shuffle=False)]
    assert plain == [b["label"][b["valid"]].tolist()
                     for b in source.batches(5, seed=9, epoch=0, shuffle=False)]
    # unshuffled: buckets by increasing length, each in dataset order
    assert all(np.all(np.diff(rows) > 0) for rows in plain)


def test_only_each_buckets_last_batch_is_padded_at_its_end():
    source, lengths = bucketed(n=11)
    batches = list(source.batches(4, seed=0, epoch=0, shuffle=False))
    sizes = {}
    for b in batches:
        n_valid = int(b["valid"].sum())
        np.testing.assert_array_equal(b["valid"], np.arange(4) < n_valid)  # pad at the end
        sizes.setdefault(bound_of(lengths[b["label"][0]]), []).append(n_valid)
    for bound, valid_rows in sizes.items():
        members = int(np.sum([bound_of(n) == bound for n in lengths]))
        assert valid_rows == [4] * (members // 4) + ([members % 4] if members % 4 else [])


def test_rows_select_this_processes_share():
    source, _ = bucketed()
    full = list(source.batches(6, seed=0, epoch=0))
    half = list(source.batches(6, seed=0, epoch=0, rows=slice(3, 6)))
    for a, b in zip(full, half, strict=True):
        np.testing.assert_array_equal(a["label"][3:], b["label"])
        np.testing.assert_array_equal(a["valid"][3:], b["valid"])
        assert a["text"][0].shape[1] == b["text"][0].shape[1]


def test_array_dataset_keeps_its_order_and_padding():
    arrays, _ = sequences(n=10)
    data = ArrayDataset(arrays)
    batches = check_contract(data, 4, seed=5, epoch=2)
    order = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(order[:10], epoch_permutation(10, 5, 2))
    np.testing.assert_array_equal(order[10:], order[:2])  # the padding repeats the start
    assert [int(b["valid"].sum()) for b in batches] == [4, 4, 2]


@pytest.mark.parametrize("lengths, bounds, match", [
    ({"text": np.full(29, 25)}, BOUNDS, r"lengths\['text'\]: expected lengths in \[0, 24\]"),
    ({"text": np.full(29, 3)}, (8, 4), "bucket_bounds: expected increasing"),
    ({"text": np.full(29, 3)}, (), "bucket_bounds"),
    ({"text": np.full(28, 3)}, BOUNDS, r"lengths\['text'\]: expected int \[29\]"),
    ({"audio": np.full(29, 3)}, BOUNDS, "'audio' is not a modality"),
    ({"score": np.full(29, 0)}, BOUNDS, "needs the same time axis"),
])
def test_bucketed_dataset_rejects_bad_settings(lengths, bounds, match):
    arrays, _ = sequences()
    with pytest.raises(ValueError, match=match):
        BucketedDataset(arrays, lengths, bucket_bounds=bounds)


def test_bounds_beyond_the_padded_length_keep_the_full_length():
    arrays, lengths = sequences()
    source = BucketedDataset(arrays, {"text": lengths}, bucket_bounds=(16, 32))
    shapes = {b["text"][0].shape[1] for b in source.batches(4, seed=0, epoch=0)}
    assert shapes == {16, T}  # the 32 bucket is cut at the arrays' length, 24
