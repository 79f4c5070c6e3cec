"""lepton_mm.augment: seeded, per-example, mask-aware augmentation.

Each transform is checked against an independent numpy re-implementation given the
draw, which the test recovers from the output (inputs are built so that exactly one draw
explains it: distinct values, a fill value that cannot occur). Padded frames hold NaN and
huge values so that "bit-identical" is checked where a careless sum or product would leak.
"""

import doctest
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_mm import augment as A

N = 64  # one batch size (and one set of shapes and settings) keeps compilations shared
RNG = np.random.default_rng(0)
FILL = -7.0  # never drawn by a standard normal in these sizes

# Images with all-distinct values, so a shift is identified by the output.
IMAGES = (RNG.permutation(N * 12 * 11 * 2).reshape(N, 12, 11, 2) + 1).astype(np.float32)


def _frame_mask(n, time, rng):
    """Contiguous valid intervals at random places (AV-MNIST style), plus edge cases."""
    start = rng.integers(0, time // 2, n)
    end = np.minimum(time, start + rng.integers(0, time, n))
    mask = (np.arange(time)[None] >= start[:, None]) & (np.arange(time)[None] < end[:, None])
    mask[0] = False  # no valid frame
    mask[1] = True  # all valid
    mask[2] = np.arange(time) < time - 3  # a prefix
    return mask


def _log_mel(n=N, time=30, mels=12, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, time, mels)).astype(np.float32)
    mask = _frame_mask(n, time, rng)
    x[~mask] = np.nan
    x[~mask & (np.arange(time)[None] % 2 == 0)] = 1e30
    return x, mask


LOG_MEL, FRAMES = _log_mel()
WAVES = np.sin(np.linspace(0, 300, 2000))[None].repeat(8, 0).astype(np.float32)
WAVE_MASK = _frame_mask(8, 2000, np.random.default_rng(3))
IDS = np.random.default_rng(4).integers(5, 50, (N, 16)).astype(np.int32)
ID_MASK = np.arange(16)[None] < np.random.default_rng(5).integers(0, 17, (N, 1))


def _same(a, b):
    """Bit-identical, NaN included."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _key(seed=0):
    return jax.random.key(seed)


# The settings used throughout; the configs repeat them, so their steps reuse the
# functions' compiled programs (integer settings are static, float ones traced).
IMAGE = A.ImageAugment(max_shift=3, brightness=0.5, contrast=0.4, cutout_size=4,
                       cutout_fill=FILL, noise_std=0.3)
AUDIO = A.AudioAugment(max_shift=4, freq_mask_width=4, num_freq_masks=1, time_mask_width=6,
                       num_time_masks=1, fill=FILL)
TEXT = A.TextAugment(rate=0.5, mask_id=3)

# ------------------------------------------------------- determinism, jit, batch size

CASES = {
    "random_translate": lambda x, k: A.random_translate(x, key=k, max_shift=3),
    "cutout": lambda x, k: A.cutout(x, key=k, size=4, fill=FILL),
    "gaussian_noise": lambda x, k: A.gaussian_noise(x, key=k, std=0.3),
    "brightness_contrast": lambda x, k: A.brightness_contrast(x, key=k, brightness=0.5,
                                                              contrast=0.4),
    "time_mask": lambda x, k: A.time_mask(x[0], x[1], key=k, max_width=6, fill=FILL),
    "freq_mask": lambda x, k: A.freq_mask(x[0], x[1], key=k, max_width=4, fill=FILL),
    "time_shift": lambda x, k: A.time_shift(x[0], x[1], key=k, max_shift=4),
    "waveform_noise": lambda x, k: A.waveform_noise(x[0], key=k, snr_db=(0, 20),
                                                    mask=x[1]),
    "mask_tokens": lambda x, k: A.mask_tokens(x[0], x[1], key=k, rate=0.5, mask_id=3),
    "image_augment": lambda x, k: IMAGE(x, k),
    "audio_augment": lambda x, k: AUDIO(x, k)[0],
    "text_augment": lambda x, k: TEXT(x, k)[0],
}
INPUTS = {
    "random_translate": IMAGES, "cutout": IMAGES, "gaussian_noise": IMAGES,
    "brightness_contrast": IMAGES, "image_augment": IMAGES,
    "time_mask": (LOG_MEL, FRAMES), "freq_mask": (LOG_MEL, FRAMES),
    "time_shift": (LOG_MEL, FRAMES), "audio_augment": (LOG_MEL, FRAMES),
    "waveform_noise": (WAVES, WAVE_MASK), "mask_tokens": (IDS, ID_MASK),
    "text_augment": (IDS, ID_MASK),
}
# Under jit: the configs run every function's code path on tracers; waveform_noise is
# in none of them.
JIT_CASES = ["audio_augment", "image_augment", "text_augment", "waveform_noise"]


def _rows(x, n):
    return jax.tree.map(lambda a: a[:n], x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_deterministic_given_the_key_and_per_example(name):
    f, x = CASES[name], INPUTS[name]
    out = f(x, _key(0))
    assert _same(out, f(x, _key(0)))
    other = np.asarray(f(x, _key(1)))
    assert not _same(out, other)
    # A raw uint32 key gives what the typed key with that data gives.
    assert _same(out, f(x, jax.random.key_data(_key(0))))
    # Example i draws from fold_in(key, i): the same in a batch of 5 as in the full batch.
    # (The configs are compositions of the functions; checking them too only compiles.)
    if not name.endswith("_augment"):
        assert _same(f(_rows(x, 5), _key(0)), np.asarray(out)[:5])


@pytest.mark.parametrize("name", JIT_CASES)
def test_jit_matches_eager(name):
    f, x = CASES[name], INPUTS[name]
    eager = np.asarray(f(x, _key(2)))
    jitted = np.asarray(jax.jit(f)(x, _key(2)))
    if np.issubdtype(eager.dtype, np.integer):
        np.testing.assert_array_equal(jitted, eager)
    else:
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- images


def _np_translate(image, dy, dx):
    """``out[y, x] = image[y - dy, x - dx]`` where that exists, else 0."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
        image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)])
    return out


def test_random_translate_moves_pixels_by_the_drawn_shift():
    s, key = 3, _key(5)
    out = np.asarray(A.random_translate(IMAGES, key=key, max_shift=s))
    shifts = []
    for image, got in zip(IMAGES, out, strict=True):
        matches = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)
                   if np.array_equal(_np_translate(image, dy, dx), got)]
        assert len(matches) == 1, matches  # distinct values: one shift explains it
        shifts.append(matches[0])
    dys, dxs = zip(*shifts, strict=True)
    assert set(dys) == set(dxs) == set(range(-s, s + 1))  # every shift, none beyond
    # The same key moves a single bright pixel at (5, 4) by the same drawn amounts.
    dot = np.zeros_like(IMAGES)
    dot[:, 5, 4, 1] = 1.0
    moved = np.asarray(A.random_translate(dot, key=key, max_shift=s))
    for i, (dy, dx) in enumerate(shifts):
        expected = np.zeros(IMAGES.shape[1:], np.float32)
        expected[5 + dy, 4 + dx, 1] = 1.0
        np.testing.assert_array_equal(moved[i], expected)


def test_cutout_is_a_square_centred_on_a_pixel_and_clipped():
    size, images = 4, IMAGES
    out = np.asarray(A.cutout(images, key=_key(6), size=size, fill=FILL))
    h, w = images.shape[1:3]
    areas = []
    for image, got in zip(images, out, strict=True):
        matches = []
        for cy in range(h):
            for cx in range(w):
                ref = image.copy()
                ref[max(cy - size // 2, 0):cy - size // 2 + size,
                    max(cx - size // 2, 0):cx - size // 2 + size] = FILL
                if np.array_equal(ref, got):
                    matches.append((cy, cx))
        assert len(matches) == 1
        areas.append(int((got[..., 0] == FILL).sum()))
    assert max(areas) == size * size and min(areas) < size * size  # full and clipped
    assert _same(A.cutout(images, key=_key(6), size=0), images)


def test_gaussian_noise_has_the_std_and_spares_padded_frames():
    x, mask = LOG_MEL, FRAMES
    out = np.asarray(A.gaussian_noise(x, key=_key(7), std=0.5, mask=mask))
    assert _same(out[~mask], x[~mask])
    noise = (out - x)[mask]
    assert abs(noise.std() - 0.5) < 0.02 and abs(noise.mean()) < 0.02
    zeros = np.zeros_like(IMAGES)
    per_image = np.asarray(A.gaussian_noise(zeros, key=_key(7), std=2.0)).std(axis=(1, 2, 3))
    assert np.all(np.abs(per_image - 2.0) < 0.4)
    assert _same(A.gaussian_noise(IMAGES, key=_key(7), std=0.0), IMAGES)


def test_brightness_contrast_is_the_affine_map_with_drawn_factors():
    brightness, contrast = 0.5, 0.4
    x = IMAGES / IMAGES.max()
    out = np.asarray(A.brightness_contrast(x, key=_key(8), brightness=brightness,
                                           contrast=contrast), np.float64)
    xs = x.astype(np.float64)
    mean = xs.mean(axis=(1, 2, 3))
    # Recover c from the spread and b from the mean; the map must be exactly affine.
    c = out.std(axis=(1, 2, 3)) / xs.std(axis=(1, 2, 3))
    b = out.mean(axis=(1, 2, 3)) - mean
    ref = (xs - mean[:, None, None, None]) * c[:, None, None, None] + (
        mean + b)[:, None, None, None]
    np.testing.assert_allclose(out, ref, atol=2e-5)
    assert np.all((c >= 1 - contrast - 1e-5) & (c <= 1 + contrast + 1e-5))
    assert np.all(np.abs(b) <= brightness + 1e-5)
    assert c.max() - c.min() > contrast and b.max() - b.min() > brightness  # spread out


# -------------------------------------------------------------------------- audio


def _np_time_mask(x, mask, start, width, fill):
    """The reference: valid frames of rank start..start+width-1 set to fill."""
    out = x.copy()
    valid = np.flatnonzero(mask)
    out[valid[start:start + width]] = fill
    return out


def _fixed_length_batch(n=N, time=30, length=22):
    """``length`` valid frames at a random offset in each example; padding is NaN."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((n, time, 12)).astype(np.float32)
    start = rng.integers(0, time - length + 1, (n, 1))
    mask = (np.arange(time)[None] >= start) & (np.arange(time)[None] < start + length)
    x[~mask] = np.nan
    return x, mask


@pytest.mark.parametrize("max_width, fraction", [(6, 1.0), (6, 0.25)])
def test_time_mask_matches_numpy_given_the_drawn_span(max_width, fraction):
    # p = 1: varied masks, the width bound T binds; p = 0.25: 22 valid frames, so
    # floor(p * tau) = 5 binds before T = 6.
    log_mel, frames = (LOG_MEL, FRAMES) if fraction == 1.0 else _fixed_length_batch()
    out = np.asarray(A.time_mask(log_mel, frames, key=_key(9), max_width=max_width,
                                 max_fraction=fraction, fill=FILL))
    widths, caps = [], []
    for x, mask, got in zip(log_mel, frames, out, strict=True):
        hit = np.all(got == FILL, axis=1)
        assert not np.any(hit & ~mask)  # only valid frames are masked
        ranks = np.cumsum(mask)[hit] - 1
        width = len(ranks)
        start = int(ranks[0]) if width else 0
        np.testing.assert_array_equal(ranks, np.arange(start, start + width))  # one span
        assert _same(got, _np_time_mask(x, mask, start, width, FILL))
        tau = int(mask.sum())
        cap = min(max_width, int(np.floor(fraction * tau)))
        assert width <= cap
        widths.append(width)
        caps.append(cap)
    widths, caps = np.array(widths), np.array(caps)
    # The bound is reached, not undershot: every width 0..cap occurs among the examples
    # with the most common cap (6 = T for p = 1, 5 = floor(0.25 * 22) for p = 0.25).
    values, counts = np.unique(caps, return_counts=True)
    common = values[np.argmax(counts)]
    assert common == (6 if fraction == 1.0 else 5)
    assert set(widths[caps == common]) == set(range(common + 1))


def test_time_mask_with_several_masks_stays_within_bounds():
    out = np.asarray(A.time_mask(LOG_MEL, FRAMES, key=_key(10), max_width=4, num_masks=3,
                                 fill=FILL))
    hit = np.all(out == FILL, axis=2)
    assert not np.any(hit & ~FRAMES) and _same(out[~FRAMES], LOG_MEL[~FRAMES])
    counts = hit.sum(axis=1)
    assert counts.max() <= 12 and counts.max() > 4  # several masks, each at most 4 wide
    assert _same(A.time_mask(LOG_MEL, FRAMES, key=_key(10), max_width=4, num_masks=0),
                 LOG_MEL)
    unmasked = ~hit[..., None] | np.zeros_like(out, bool)
    assert _same(out[unmasked & FRAMES[..., None]], LOG_MEL[unmasked & FRAMES[..., None]])


def test_freq_mask_matches_numpy_given_the_drawn_band():
    max_width = 4
    out = np.asarray(A.freq_mask(LOG_MEL, FRAMES, key=_key(11), max_width=max_width,
                                 fill=FILL))
    widths = []
    for x, mask, got in zip(LOG_MEL, FRAMES, out, strict=True):
        assert _same(got[~mask], x[~mask])
        bins = np.flatnonzero(np.all(got[mask] == FILL, axis=0)) if mask.any() else []
        width = len(bins)
        if width:
            np.testing.assert_array_equal(bins, np.arange(bins[0], bins[0] + width))
        ref = x.copy()
        if width:
            ref[np.ix_(mask, bins)] = FILL
        assert _same(got, ref)
        if mask.any():
            widths.append(width)
    assert set(widths) == set(range(max_width + 1))
    with pytest.raises(ValueError, match="max_width: expected at most the 12 mel bins"):
        A.freq_mask(LOG_MEL, FRAMES, key=_key(0), max_width=13)


def test_time_shift_rolls_the_valid_frames():
    s, seen = 4, set()
    for seed in (12, 13, 14):  # ~150 draws: every shift in [-4, 4] occurs
        out = np.asarray(A.time_shift(LOG_MEL, FRAMES, key=_key(seed), max_shift=s))
        for x, mask, got in zip(LOG_MEL, FRAMES, out, strict=True):
            valid = np.flatnonzero(mask)
            matches = []
            for shift in range(-s, s + 1):
                ref = x.copy()
                ref[valid] = np.roll(x[valid], shift, axis=0)
                if _same(ref, got):
                    matches.append(shift)
            assert matches, "no shift in [-max_shift, max_shift] explains the output"
            if len(valid) > 2 * s:
                assert len(matches) == 1
                seen.add(matches[0])
    assert seen == set(range(-s, s + 1))


def _measured_snr(clean, noisy, inside):
    noise = (noisy - clean)[inside].astype(np.float64)
    signal = clean[inside].astype(np.float64)
    return 10 * np.log10(np.mean(signal ** 2) / np.mean(noise ** 2))


def test_waveform_noise_reaches_the_drawn_snr_on_the_clip_only():
    n, samples = 24, 6000
    rng = np.random.default_rng(13)
    start = rng.integers(0, 1000, n)
    length = rng.integers(3000, 5000, n)
    position = np.arange(samples)[None]
    inside = (position >= start[:, None]) & (position < (start + length)[:, None])
    amplitude = rng.uniform(0.01, 3.0, (n, 1))
    waves = (amplitude * np.sin(position * rng.uniform(0.01, 0.2, (n, 1)))).astype(
        np.float32)
    waves[~inside] = np.nan  # outside the clip: must not leak into the RMS
    for snr in (-5.0, 10.0, 30.0):
        noisy = np.asarray(A.waveform_noise(waves, key=_key(14), snr_db=snr, mask=inside))
        assert _same(noisy[~inside], waves[~inside])
        measured = [_measured_snr(waves[i], noisy[i], inside[i]) for i in range(n)]
        np.testing.assert_allclose(measured, snr, atol=0.25)
    low, high = 0.0, 20.0
    noisy = np.asarray(A.waveform_noise(waves, key=_key(15), snr_db=(low, high),
                                        mask=inside))
    measured = np.array([_measured_snr(waves[i], noisy[i], inside[i]) for i in range(n)])
    assert np.all((measured > low - 0.3) & (measured < high + 0.3))
    assert measured.min() < 5 and measured.max() > 15  # drawn across the range
    # lengths= is a prefix mask.
    prefix = position < length[:, None]
    clean = np.where(prefix, waves, 0).astype(np.float32)
    a = A.waveform_noise(clean, key=_key(16), snr_db=(5, 6), lengths=length.astype(np.int32))
    b = A.waveform_noise(clean, key=_key(16), snr_db=(5, 6), mask=prefix)
    assert _same(a, b)


# --------------------------------------------------------------------------- text


def test_mask_tokens_replaces_only_eligible_tokens_at_the_rate():
    n, length, cls, sep, mask_id = 200, 24, 1, 2, 3
    rng = np.random.default_rng(17)
    lengths = rng.integers(2, length + 1, n)
    mask = np.arange(length)[None] < lengths[:, None]
    ids = rng.integers(5, 1000, (n, length)).astype(np.int32)
    ids[:, 0] = cls
    ids[np.arange(n), lengths - 1] = sep
    ids[~mask] = 0
    keep = np.zeros_like(mask)
    keep[:, 1] = True
    out = np.asarray(A.mask_tokens(ids, mask, key=_key(18), rate=0.3, mask_id=mask_id,
                                   keep=keep, keep_ids=(cls, sep)))
    eligible = mask & ~keep & (ids != cls) & (ids != sep)
    changed = out != ids
    assert not np.any(changed & ~eligible)
    assert np.all(out[changed] == mask_id)
    assert abs(changed[eligible].mean() - 0.3) < 0.03
    everything = np.asarray(A.mask_tokens(ids, mask, key=_key(18), rate=1.0,
                                          mask_id=mask_id, keep=keep, keep_ids=(cls, sep)))
    np.testing.assert_array_equal(everything, np.where(eligible, mask_id, ids))
    assert _same(A.mask_tokens(ids, mask, key=_key(18), rate=0.0, mask_id=mask_id,
                               keep=keep, keep_ids=(cls, sep)), ids)


# -------------------------------------------------------------------------- mixup


def _batch(n=N, seed=19):
    """A tri-modal batch in the shapes above, some modalities absent per example."""
    rng = np.random.default_rng(seed)
    log_mel, frames = _log_mel(n, seed=seed)
    present = rng.random((3, n)) < 0.7
    return {
        "image": rng.standard_normal((n, *IMAGES.shape[1:])).astype(np.float32),
        "audio": (log_mel, frames),
        "text": (rng.integers(5, 30, (n, 16)).astype(np.int32),
                 np.arange(16)[None] < rng.integers(1, 17, (n, 1))),
        "label": rng.integers(0, 4, n).astype(np.int32),
        "present": {"image": present[0], "audio": present[1], "text": present[2]},
        "valid": np.ones(n, bool),
    }


def test_mixup_batch_mixes_present_valid_cells_with_the_partner():
    batch = _batch()
    out, mix = A.mixup_batch(batch, key=_key(20), alpha=0.4)
    again, same_mix = A.mixup_batch(batch, key=_key(20), alpha=0.4)
    other = A.mixup_batch(batch, key=_key(21), alpha=0.4)[1]
    assert _same(again["image"], out["image"]) and _same(same_mix.partner, mix.partner)
    assert not _same(other.weight, mix.weight)
    w, p = np.asarray(mix.weight), np.asarray(mix.partner)
    assert w.dtype == np.float32 and np.all((w >= 0) & (w <= 1)) and w.std() > 0.1
    np.testing.assert_array_equal(np.sort(p), np.arange(len(p)))
    present = batch["present"]
    # image: mixed where both rows have the image.
    x = batch["image"]
    both = present["image"] & present["image"][p]
    ref = np.where(both[:, None, None, None],
                   w[:, None, None, None] * x + (1 - w[:, None, None, None]) * x[p], x)
    np.testing.assert_allclose(out["image"], ref, rtol=1e-6, atol=1e-6)
    assert _same(np.asarray(out["image"])[~both], x[~both])
    # audio: mixed where both frames are valid and both rows have audio.
    (x, m), (got, got_mask) = batch["audio"], out["audio"]
    ok = m & m[p] & (present["audio"] & present["audio"][p])[:, None]
    ref = w[:, None, None] * x + (1 - w[:, None, None]) * x[p]
    np.testing.assert_allclose(np.asarray(got)[ok], ref[ok], rtol=1e-6, atol=1e-6)
    assert _same(np.asarray(got)[~ok], x[~ok]) and got_mask is m
    # A row that no modality mixed keeps weight 1 (its label stays its own); a mixed
    # row keeps the drawn weight.
    unmixed = ~(present["image"] & present["image"][p]) & ~np.any(ok, axis=1)
    assert unmixed.any() and np.all(w[unmixed] == 1.0)
    assert np.all(w[~unmixed] < 1.0) and w[~unmixed].std() > 0.1
    # token ids are not mixed; labels, present, valid pass through.
    assert out["text"] is batch["text"] and out["label"] is batch["label"]
    soft = np.asarray(A.mix_labels(batch["label"], mix, num_classes=4))
    onehot = np.eye(4, dtype=np.float32)[batch["label"]]
    np.testing.assert_allclose(soft, w[:, None] * onehot + (1 - w[:, None]) * onehot[p],
                               rtol=1e-6)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(A.mix_labels(onehot, mix), soft, rtol=1e-6)
    # Only the named modality is mixed.
    image_only, _ = A.mixup_batch(batch, key=_key(20), alpha=0.4, modalities=["image"])
    assert image_only["audio"] is batch["audio"]
    np.testing.assert_array_equal(image_only["image"], out["image"])


# -------------------------------------------------------------------- composition

AUGMENTER = A.Augmenter({"image": IMAGE, "audio": AUDIO, "text": TEXT})


def test_augmenter_leaves_absent_modalities_and_padding_bit_identical():
    batch = _batch()
    out = AUGMENTER(batch, _key(21))
    for m in ("image", "audio", "text"):
        absent = ~batch["present"][m]
        for before, after in zip(jax.tree.leaves(batch[m]), jax.tree.leaves(out[m]),
                                 strict=True):
            assert _same(np.asarray(after)[absent], before[absent]), m
        data = jax.tree.leaves(batch[m])[0]  # ... while present examples change
        assert not _same(np.asarray(jax.tree.leaves(out[m])[0])[~absent], data[~absent]), m
    for m in ("audio", "text"):
        (x, mask), (got, got_mask) = batch[m], out[m]
        assert _same(got_mask, mask)
        assert _same(np.asarray(got)[~mask], x[~mask]), m
    for k in ("label", "present", "valid"):
        assert out[k] is batch[k]
    again, other = AUGMENTER(batch, _key(21)), AUGMENTER(batch, _key(1))
    for m in ("image", "audio", "text"):
        assert _same(jax.tree.leaves(again[m])[0], jax.tree.leaves(out[m])[0])
        assert not _same(jax.tree.leaves(other[m])[0], jax.tree.leaves(out[m])[0])


def test_augmenter_guards_padding_against_any_transform():
    def rogue(inputs, key):  # writes everywhere and marks every frame valid
        del key
        x, mask = inputs
        return jnp.full_like(x, 5.0), jnp.ones_like(mask)

    batch = _batch()
    x, mask = batch["audio"]
    got, got_mask = A.Augmenter({"audio": rogue})(batch, _key(0))["audio"]
    present = batch["present"]["audio"][:, None]
    assert _same(got_mask, mask)
    assert _same(got, np.where((mask & present)[..., None], np.float32(5.0), x))


def test_augmenter_modalities_draw_independently():
    batch = _batch()
    twin = {"a": batch["image"], "b": batch["image"].copy(), "label": batch["label"]}
    image = A.ImageAugment(noise_std=1.0)
    out = A.Augmenter({"a": image, "b": image})(twin, _key(22))
    assert not _same(out["a"], out["b"])
    alone = A.Augmenter({"a": image})(twin, _key(22))
    assert _same(alone["a"], out["a"])  # adding a modality does not change the others
    # Modality a draws from fold_in(key, crc32("a")), as documented.
    tag = zlib.crc32(b"a") & 0x7FFFFFFF
    assert _same(out["a"], image(batch["image"], jax.random.fold_in(_key(22), tag)))


def test_augmenter_is_a_hashable_static_config():
    same = A.Augmenter({  # equal configs, built anew, in another order
        "text": A.TextAugment(rate=0.5, mask_id=3),
        "image": A.ImageAugment(max_shift=3, brightness=0.5, contrast=0.4, cutout_size=4,
                                cutout_fill=FILL, noise_std=0.3),
        "audio": A.AudioAugment(max_shift=4, freq_mask_width=4, time_mask_width=6,
                                fill=FILL)})
    assert same == AUGMENTER and hash(same) == hash(AUGMENTER)
    assert [name for name, _ in AUGMENTER.transforms] == ["audio", "image", "text"]
    batch = _batch()
    step = jax.jit(lambda aug, b, k: aug(b, k), static_argnums=0)
    jitted, eager = step(same, batch, _key(1)), AUGMENTER(batch, _key(1))
    for m in ("image", "audio", "text"):
        for a, b in zip(jax.tree.leaves(jitted[m]), jax.tree.leaves(eager[m]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- validation

X4, MEL = IMAGES[:2], (LOG_MEL[:2], FRAMES[:2])
BAD = [
    (lambda: A.random_translate(X4, key=_key(), max_shift=-1), ValueError,
     r"max_shift: expected an int >= 0, got -1"),
    (lambda: A.random_translate(X4, key=_key(), max_shift=1.5), TypeError, "max_shift"),
    (lambda: A.random_translate(X4[0], key=_key(), max_shift=1), ValueError,
     r"images: expected rank 4"),
    (lambda: A.random_translate(X4.astype(np.int32), key=_key(), max_shift=1), TypeError,
     r"images: expected a floating-point dtype"),
    (lambda: A.random_translate(X4, key=0, max_shift=1), TypeError, r"key: expected a PRNG"),
    (lambda: A.cutout(X4, key=_key(), size=-2), ValueError, "size"),
    (lambda: A.cutout(X4, key=_key(), size=2, fill=float("nan")), ValueError, "fill"),
    (lambda: A.gaussian_noise(X4, key=_key(), std=-0.1), ValueError, r"std: .*>= 0"),
    (lambda: A.gaussian_noise(MEL[0], key=_key(), std=0.1, mask=MEL[1][:, :4]), ValueError,
     r"mask: expected bool \[batch, time\]"),
    (lambda: A.brightness_contrast(X4, key=_key(), contrast=1.5), ValueError,
     r"contrast: expected a rate in \[0, 1\]"),
    (lambda: A.brightness_contrast(X4, key=_key(), brightness=-1), ValueError, "brightness"),
    (lambda: A.time_mask(*MEL, key=_key(), max_width=2, max_fraction=1.2), ValueError,
     r"max_fraction: expected a rate in \[0, 1\]"),
    (lambda: A.time_mask(*MEL, key=_key(), max_width=-2), ValueError, "max_width"),
    (lambda: A.time_mask(MEL[0], MEL[1].astype(np.float32), key=_key(), max_width=2),
     TypeError, "mask: expected bool"),
    (lambda: A.time_mask(MEL[0][..., 0], MEL[1], key=_key(), max_width=2), ValueError,
     r"log_mel: expected rank 3"),
    (lambda: A.freq_mask(*MEL, key=_key(), max_width=2, num_masks=-1), ValueError,
     "num_masks"),
    (lambda: A.time_shift(*MEL, key=_key(), max_shift=True), TypeError, "max_shift"),
    (lambda: A.waveform_noise(WAVES, key=_key(), snr_db=(10, 5)), ValueError,
     r"snr_db: expected low <= high"),
    (lambda: A.waveform_noise(WAVES, key=_key(), snr_db=(float("nan"), 5)), ValueError,
     r"snr_db\[0\]"),
    (lambda: A.waveform_noise(WAVES, key=_key(), snr_db="10"), TypeError, "snr_db"),
    (lambda: A.waveform_noise(WAVES, key=_key(), snr_db=5, mask=WAVE_MASK,
                              lengths=np.ones(8, np.int32)), ValueError, "mask, lengths"),
    (lambda: A.waveform_noise(WAVES, key=_key(), snr_db=5, lengths=np.ones(8)), TypeError,
     "lengths: expected an integer dtype"),
    (lambda: A.mask_tokens(IDS, ID_MASK, key=_key(), rate=-0.1, mask_id=3), ValueError,
     r"rate: expected a rate in \[0, 1\]"),
    (lambda: A.mask_tokens(IDS.astype(np.float32), ID_MASK, key=_key(), rate=0.1,
                           mask_id=3), TypeError, "ids: expected an integer dtype"),
    (lambda: A.mask_tokens(IDS.astype(np.int8), ID_MASK, key=_key(), rate=0.1,
                           mask_id=300), ValueError, "mask_id: expected an id that fits"),
    (lambda: A.mask_tokens(IDS, ID_MASK[:, :3], key=_key(), rate=0.1, mask_id=3),
     ValueError, "mask: expected shape"),
    (lambda: A.mixup_batch(_batch(), key=_key(), alpha=0.0), ValueError, r"alpha: .*> 0"),
    (lambda: A.mixup_batch(_batch(), key=_key(), alpha=0.2, modalities=["text"]), TypeError,
     "batch\\['text'\\] data: expected a floating-point dtype"),
    (lambda: A.mixup_batch(_batch(), key=_key(), alpha=0.2, modalities=["video"]),
     ValueError, "modalities: unrecognized modality 'video'"),
    (lambda: A.mix_labels(np.zeros(16, np.int32),
                          A.Mixup(jnp.ones(16), jnp.arange(16))), ValueError, "num_classes"),
    (lambda: A.mix_labels(np.zeros(16, np.int32), A.Mixup(jnp.ones(16), jnp.arange(16)),
                          num_classes=4.0), TypeError, "num_classes: expected a positive int"),
    (lambda: A.mix_labels(np.zeros(16, np.int32), A.Mixup(jnp.ones(16), jnp.arange(16)),
                          num_classes=0), ValueError, "num_classes: expected a positive int"),
    (lambda: A.ImageAugment(contrast=2.0), ValueError, "contrast"),
    (lambda: A.AudioAugment(num_time_masks=-1), ValueError, "num_time_masks"),
    (lambda: A.AudioAugment(time_mask_fraction=1.5), ValueError, "time_mask_fraction"),
    (lambda: A.TextAugment(rate=1.5, mask_id=3), ValueError, "rate"),
    (lambda: A.TextAugment(rate=0.5, mask_id=3, keep_ids=[1]), TypeError, "keep_ids"),
    (lambda: A.Augmenter({"label": A.ImageAugment()}), ValueError, "reserved batch key"),
    (lambda: A.Augmenter({"image": 3}), TypeError, r"transforms\['image'\]: expected a call"),
    (lambda: A.Augmenter({}), ValueError, "transforms: expected at least one"),
    (lambda: A.Augmenter({"video": A.ImageAugment()})(_batch(), _key()), ValueError,
     "unrecognized modality 'video'"),
    (lambda: A.Augmenter({"image": lambda x, k: x[:, :3]})(_batch(), _key()), TypeError,
     r"transforms\['image'\]: leaf 0 must keep shape"),
    (lambda: A.Augmenter({"audio": lambda x, k: x[0]})(_batch(), _key()), TypeError,
     r"transforms\['audio'\]: must return the structure"),
]


@pytest.mark.parametrize("call, error, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_arguments_raise_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_docstring_examples_run():
    results = doctest.testmod(A, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted > 0 and results.failed == 0
