"""The ``fastjepa`` command: one entry for everything the package does.

    fastjepa train --config in1k_vith14_ep300 data.root_path=/data logging.folder=runs/h14
    fastjepa demo                  # pretrain on the bundled MNIST digits, then probe
    fastjepa probe --checkpoint runs/h14 --data imagefolder --train /data/train --val /data/val
    fastjepa config in1k_vith14_ep300 optimization.lr=5e-4
    fastjepa make-shards /data/imagenet/train /data/shards
    fastjepa bench --suite kernels
    fastjepa --version

Each command takes the arguments of its module entry point (``python -m fastjepa.train`` and so on), which keep
working; ``fastjepa COMMAND --help`` lists them.
"""

import argparse
import importlib
import sys

from fastjepa import __version__

# command: (module whose main(argv) runs it, one line of help)
COMMANDS = {
    "train": ("fastjepa.train", "I-JEPA pretraining (single process, DDP, FSDP2 under torchrun)"),
    "demo": ("fastjepa.demo", "the main job: pretrain on the bundled MNIST digits, then linear-probe"),
    "probe": ("fastjepa.eval.probe", "linear-probe and k-NN top-1 of a pretrained encoder"),
    "config": ("fastjepa.config", "load, validate and print a config (a shipped one by name, or a YAML file)"),
    "make-shards": ("fastjepa.data.make_shards", "write WebDataset shards and their index from images"),
    "bench": ("fastjepa.bench.__main__", "the microbenchmark suite: kernels, step, attention, data"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastjepa", description="Fast I-JEPA pretraining.",
        epilog="\n".join(f"  {name:12s} {text}" for name, (_, text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastjepa {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    code = module.main(args.args)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
