"""Hugging Face checkpoints in the zoo: length extrapolation of converted models on the embedded
corpus.

    python experiments/hf_import.py --out=experiments/results/hf_import [--only=llama]

Each cell builds a small randomly initialised Hugging Face model with `transformers` (no
download: its architecture and position scheme are what matter here), saves it with
`save_pretrained`, converts it with `python -m lexjax.convert`, trains it from the converted
weights with `python -m lexjax.train --init_from` at TRAIN_LENGTH 128 on the embedded corpus,
and evaluates it at 1x-8x that length with `python -m lexjax.evaluate`: the same commands a
researcher runs on a real checkpoint (see the README). The `llama_pi4` cell continues the
`llama` run at 512 tokens with RoPE's positions interpolated 4x (Chen et al. 2023), the cheap
context extension the issue asks about. Finished cells are skipped; the report
(`OUT/hf_import.{md,json,png}`) is rebuilt from the finished ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from commands import binding_flags, run_logged  # noqa: E402
from encoder_runs import eval_rows, markdown_table, run_matrix  # noqa: E402

LENGTHS = (128, 256, 512, 1024)
SIZE = dict(vocab_size=384, hidden_size=128, layers=4, heads=4, mlp=512)
TRAIN = ("TRAIN_STEPS=600", "LEARNING_RATE=1e-3", "WARMUP_STEPS=60", "BATCH_SIZE=16",
         "TRAIN_LENGTH=128", "EVAL_EVERY=600", "CHECKPOINT_EVERY=600", "LOG_EVERY=100")


def hf_model(name: str):
    """A randomly initialised transformers model of the cell's architecture (byte vocabulary
    padded to 384 ids, 4 layers of width 128)."""
    import torch
    import transformers
    torch.manual_seed(0)
    v, d, n, h, m = (SIZE[k] for k in ("vocab_size", "hidden_size", "layers", "heads", "mlp"))
    common = dict(vocab_size=v, hidden_size=d, num_hidden_layers=n, num_attention_heads=h,
                  intermediate_size=m, max_position_embeddings=1024)
    builders = {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=v, n_embd=d, n_layer=n, n_head=h, n_positions=1024)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, num_key_value_heads=2)),
        "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            **common, rotary_pct=0.25)),
        "bloom": lambda: transformers.BloomForCausalLM(transformers.BloomConfig(
            vocab_size=v, hidden_size=d, n_layer=n, n_head=h)),
        "mpt": lambda: transformers.MptForCausalLM(transformers.MptConfig(
            vocab_size=v, d_model=d, n_layers=n, n_heads=h, max_seq_len=1024)),
    }
    return builders[name]()


# cell -> (architecture, position scheme as the table names it, the run it continues, extra)
CELLS = {
    "gpt2": ("gpt2", "learned absolute", None, ()),
    "llama": ("llama", "RoPE", None, ()),
    "gpt_neox": ("gpt_neox", "RoPE on 1/4 of each head", None, ()),
    "bloom": ("bloom", "ALiBi", None, ()),
    "mpt": ("mpt", "ALiBi", None, ()),
    "llama_pi4": ("llama", "RoPE, positions / 4, 200 more steps at 512", "llama",
                  ("TRAIN_LENGTH=512", "TRAIN_STEPS=200", "BATCH_SIZE=4", "WARMUP_STEPS=20",
                   "EVAL_EVERY=200", "CHECKPOINT_EVERY=200", "LOG_EVERY=50",
                   "lexjax.positions.RoPE.interpolation=4.0")),
}


def run_cell(name: str, out: str) -> dict:
    """Converts, trains and evaluates one cell (or reads back its record)."""
    cell = os.path.join(out, "cells", name)
    record_path = os.path.join(cell, "record.json")
    if os.path.exists(record_path):
        return json.load(open(record_path))
    os.makedirs(cell, exist_ok=True)
    log = os.path.join(cell, "log.txt")
    arch, scheme, continues, extra = CELLS[name]
    if continues:
        source = os.path.join(out, "cells", continues, "trained")
        config = os.path.join(out, "cells", continues, "converted", "config.gin")
        if not os.path.isdir(source):
            raise RuntimeError(f"cell {name} continues cell {continues}: run that one first")
        bindings = (*TRAIN, *extra)
    else:
        hf_dir, source = os.path.join(cell, "hf"), os.path.join(cell, "converted")
        if not os.path.isdir(source):
            hf_model(arch).save_pretrained(hf_dir)
            run_logged([sys.executable, "-m", "lexjax.convert", f"--from_hf={hf_dir}",
                        f"--model_dir={source}"], log)
        config, bindings = os.path.join(source, "config.gin"), TRAIN
    trained = os.path.join(cell, "trained")
    run_logged([sys.executable, "-m", "lexjax.train", f"--gin_file={config}",
                f"--init_from={source}", f"--model_dir={trained}",
                *binding_flags(bindings)], log)
    run_logged([sys.executable, "-m", "lexjax.evaluate", f"--model_dir={trained}",
                "--lengths=" + ",".join(map(str, LENGTHS)), "--max_tokens=65536"], log)
    rows = eval_rows(trained, "extrapolation")
    record = {"cell": name, "architecture": arch, "positions": scheme,
              "train_length": 512 if continues else 128,
              **{f"ppl@{r['length']}": float(r["perplexity"]) for r in rows}}
    json.dump(record, open(record_path, "w"), indent=1)
    return record


def build_report(records: dict, out: str) -> str:
    rows = [records[name] for name in CELLS if name in records]
    columns = ["cell", "architecture", "positions", "train_length",
               *[f"ppl@{n}" for n in LENGTHS]]
    table = markdown_table(rows, columns)
    with open(os.path.join(out, "hf_import.md"), "w") as f:
        f.write(table)
    json.dump({"rows": rows, "lengths": LENGTHS}, open(os.path.join(out, "hf_import.json"), "w"),
              indent=1)
    plot(rows, os.path.join(out, "hf_import.png"))
    return table


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.plot(LENGTHS, [row[f"ppl@{n}"] for n in LENGTHS], marker="o",
                label=f"{row['cell']} ({row['positions']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("test perplexity (bytes)")
    ax.set_title("Converted Hugging Face architectures (trained at 128; llama_pi4 at 512)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/results/hf_import")
    parser.add_argument("--only", default=None, choices=list(CELLS))
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    print(run_matrix(list(CELLS), lambda name: run_cell(name, args.out),
                     lambda records: build_report(records, args.out), args.out, args.only))


if __name__ == "__main__":
    main()
