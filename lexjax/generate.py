"""Continue text with a trained run: `python -m lexjax.generate --model_dir=D --prompt=TEXT
[--prompt=TEXT ...] [--prompt_file=F] [--max_new_tokens=N] [--temperature=T] [--top_k=K]
[--top_p=P] [--seed=S] [--step=STEP] [--mesh=M]`.

Each prompt (every `--prompt`, and the whole text of `--prompt_file`) is encoded with the run's
vocabulary after a BOS (token 0: how the trainer shows a document's start), all prompts are
decoded together in one batch (`lexjax.generate`, ragged lengths), and each is printed followed
by its continuation, up to the vocabulary's EOS. Greedy by default (`--temperature=0`).
"""
from __future__ import annotations

import argparse
import sys
import types

from lexjax import cli, generation


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lexjax.generate", description=__doc__)
    cli.add_gin_flags(parser)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompt_file", default=None, help="a file whose text is one prompt")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--mesh", default="", help="device mesh, e.g. data:2,tensor:4")
    args, bindings = cli.parse_args(parser, sys.argv[1:] if argv is None else argv)

    from lexjax.errors import ConfigError
    generation.check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    texts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompt_file {args.prompt_file} is not UTF-8 text ({e.reason} "
                              f"at byte {e.start})") from None
    if not texts:
        raise ConfigError("give a prompt: --prompt=TEXT (repeatable) or --prompt_file=F")

    import jax
    import numpy as np

    from lexjax import partitioning
    from lexjax.runs import load_run
    mesh = partitioning.make_mesh(args.mesh) if args.mesh else None
    run = load_run(args.model_dir, args.step, gin_files=args.gin_file, bindings=bindings,
                   mesh=mesh)
    if run.model.bidirectional:
        raise ConfigError(f"{args.model_dir} holds a bidirectional encoder "
                          f"({type(run.model).__name__}, {run.config.objective.name}): it reads "
                          "whole inputs and does not generate; evaluate it with "
                          "python -m lexjax.evaluate")
    vocabulary = run.config.data.seqio_vocabulary()
    encoded = [[generation.PAD_ID] + list(vocabulary.encode(text)) for text in texts]
    lengths = np.array([len(ids) for ids in encoded])
    prompt = np.full((len(encoded), lengths.max()), generation.PAD_ID, np.int32)
    for row, ids in enumerate(encoded):
        prompt[row, :len(ids)] = ids
    mesh = mesh or partitioning.make_mesh("", jax.devices()[:1])
    with partitioning.mesh_context(mesh, run.config.logical_axis_rules):
        tokens = generation.generate(
            run.model, run.variables, prompt, args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            rng=jax.random.PRNGKey(args.seed), eos_id=vocabulary.eos_id, prompt_lengths=lengths)
    tokens = np.asarray(tokens)
    for row, (text, length) in enumerate(zip(texts, lengths)):
        new = tokens[row, length:length + args.max_new_tokens].tolist()
        if vocabulary.eos_id in new:
            new = new[:new.index(vocabulary.eos_id)]
        separator = "\n" + "-" * 72 + "\n" if row else ""
        print(f"{separator}{text}{vocabulary.decode(new)}")
    return 0


class _CallableModule(types.ModuleType):
    """Importing this CLI module rebinds the package attribute `lexjax.generate` from the function
    to the module; calling the module calls `lexjax.generation.generate`, so `lexjax.generate(...)`
    works either way."""

    def __call__(self, *args, **kwargs):
        return generation.generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    cli.run_main(main)
