"""`python -m lexjax.convert --from_hf=DIR --model_dir=OUT [--mesh=M]`: a Hugging Face
checkpoint directory becomes a lexjax run directory (see `lexjax.convert`)."""
from __future__ import annotations

import argparse
import sys

from lexjax import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lexjax.convert", description=__doc__)
    parser.add_argument("--from_hf", required=True,
                        help="a directory written by save_pretrained (config.json + weights)")
    parser.add_argument("--model_dir", required=True, help="the run directory to write")
    parser.add_argument("--mesh", default="", help="place the parameters on this device mesh, "
                        "e.g. fsdp:8 (default: one device)")
    parser.add_argument("--verbose", action="store_true")
    def check_checkpoint(args):  # before the heavy imports: bad input fails in a moment
        from lexjax.convert import read_conversion
        read_conversion(args.from_hf)

    args, bindings = cli.parse_args(parser, sys.argv[1:] if argv is None else argv,
                                    first=check_checkpoint)
    if bindings:
        parser.error("convert takes no gin bindings: the model follows the checkpoint's "
                     "config.json (adjust the run later with --gin.NAME=VALUE on train/evaluate)")

    from lexjax.convert import convert
    convert(args.from_hf, args.model_dir, args.mesh, log=lambda line: print(line, file=sys.stderr))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
