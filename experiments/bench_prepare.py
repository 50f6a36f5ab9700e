"""prepare_data throughput, and the train loop reading prepared data against a bare step.

1. **Prepare throughput**: the bundled train text repeated to at least ``--target_mb`` MB (its
   48 documents each time, separated as in the bundled file) is prepared with each tokenizer of
   ``--tokenizers``.  A BPE is trained once (its time is printed), then the corpus is encoded
   again with that tokenizer.json for each ``--workers`` count: tokens/s of the encode phase
   (reading, encoding, writing, worker start-up included; BPE training excluded) and of the
   whole call.  Repetition makes the word cache warmer than on a real corpus of that size (the
   first copy is all the distinct words there are); the one-copy line shows the cold rate.
2. **Loop vs bare step**: ``experiments/bench_input_pipeline.py``'s two measurements (the full
   ``train_and_evaluate`` loop vs the jitted step alone on pre-made device batches), with
   ``data.source=prepared`` on the ``--loop_tokenizer`` directory from step 1.

    python experiments/bench_prepare.py [--target_mb=50] [--workers=1,2]
        [--tokenizers=bytes,bpe:2048,bpe:32000] [--config=configs/umup_proxy.py:cpu]

Prints every number, the load average around each phase (the machine may be shared), and a JSON
summary line.
"""

import argparse
import json
import lzma
import math
import os
import pathlib
import statistics
import tempfile
import time

import jax

import bench_input_pipeline  # experiments/ is on sys.path when this script runs
from umup_jax import config as config_lib
from umup_jax import data as data_lib
from umup_jax import prepare_data as P


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def build_corpus(root: pathlib.Path, target_mb: float) -> tuple[pathlib.Path, pathlib.Path]:
    paths = data_lib.bundled_paths()
    text = lzma.open(paths["train"], "rt", encoding="utf-8").read()
    copies = max(math.ceil(target_mb * 1e6 / len(text.encode("utf-8"))), 1)
    train, valid = root / "train.txt", root / "valid.txt"
    with open(train, "w", encoding="utf-8") as f:
        for i in range(copies):
            f.write(("\n\x0c\n" if i else "") + text)
    valid.write_text(lzma.open(paths["valid"], "rt", encoding="utf-8").read(), encoding="utf-8")
    (root / "train_1copy.txt").write_text(text, encoding="utf-8")
    return train, valid


def prepare_once(train, valid, tokenizer, out, workers) -> dict:
    t0 = time.perf_counter()
    meta = P.prepare(P.TextFiles([str(train)]), P.TextFiles([str(valid)], field="--valid_files"),
                     tokenizer, out, workers=workers, overwrite=True)
    wall = time.perf_counter() - t0
    return {"tokens": meta["tokens"], "encode_s": meta["seconds"]["encode"],
            "encode_tokens_per_s": meta["tokens_per_second"], "wall_s": round(wall, 2),
            "wall_tokens_per_s": round(meta["tokens"] / wall), "meta": meta}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target_mb", type=float, default=50.0)
    p.add_argument("--tokenizers", default="bytes,bpe:2048,bpe:32000")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--config", default="configs/umup_proxy.py:cpu")
    p.add_argument("--loop_tokenizer", default="bpe:2048")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", default="", help="keep the corpus and prepared dirs here")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        train, valid = build_corpus(root, args.target_mb)
        mb = train.stat().st_size / 1e6
        print(f"corpus: {train} {mb:.1f} MB ({os.cpu_count()} CPUs; {load()})", flush=True)
        summary = {"corpus_mb": round(mb, 1), "prepare": {}, "jax": jax.__version__}
        dirs = {}
        for spec in args.tokenizers.split(","):
            name = spec.replace(":", "")
            tok_spec, rows = spec, {}
            if spec.startswith("bpe:"):
                first = prepare_once(train, valid, spec, root / f"{name}-trained", max(workers))
                sample = first["meta"]["tokenizer"]["bpe_sample"]
                print(f"{spec}: BPE trained on {sample['chars'] / 1e6:.1f} M characters in "
                      f"{sample['train_seconds']:.1f}s (single-threaded); {load()}", flush=True)
                tok_spec = str(root / f"{name}-trained" / "tokenizer.json")
                rows["bpe_train_s"] = sample["train_seconds"]
                cold = prepare_once(root / "train_1copy.txt", valid, tok_spec,
                                    root / f"{name}-cold", 1)
                rows["one_copy_1_worker_tokens_per_s"] = cold["encode_tokens_per_s"]
                print(f"{spec}: 1 worker, one 6 MB copy (cold word cache): "
                      f"{cold['encode_tokens_per_s']:,} tokens/s", flush=True)
            for w in workers:
                r = prepare_once(train, valid, tok_spec, root / f"{name}-w{w}", w)
                dirs[spec] = root / f"{name}-w{w}"
                rows[f"workers_{w}"] = {k: v for k, v in r.items() if k != "meta"}
                print(f"{spec}: {w} worker(s): {r['tokens']:,} tokens, encode "
                      f"{r['encode_s']:.2f}s = {r['encode_tokens_per_s']:,} tokens/s; whole call "
                      f"{r['wall_s']:.2f}s = {r['wall_tokens_per_s']:,} tokens/s; {load()}",
                      flush=True)
            summary["prepare"][spec] = rows

        config = config_lib.load_config_file(args.config)
        config.data.source = "prepared"
        config.data.prepared_dir = str(dirs[args.loop_tokenizer])
        loop, bare = [], []
        for r in range(args.rounds):
            loop.append(bench_input_pipeline.loop_rate(config, args.steps))
            bare.append(bench_input_pipeline.bare_rate(config, args.steps))
            print(f"round {r}: loop {loop[-1]:.3f} steps/s, bare step {bare[-1]:.3f} steps/s; "
                  f"{load()}", flush=True)
        lm, bm = statistics.median(loop), statistics.median(bare)
        summary.update({"loop_config": args.config, "loop_data": args.loop_tokenizer,
                        "loop_steps_per_s": round(lm, 4), "bare_steps_per_s": round(bm, 4),
                        "ratio": round(lm / bm, 4), "load_average": os.getloadavg()})
        print(json.dumps(summary))
        print(f"full loop on prepared data / jitted step alone = {lm / bm:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
