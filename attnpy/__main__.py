"""python -m attnpy demo [OUTDIR]"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnpy",
                                     description="attnpy: attention for learning, "
                                                 "checking and running.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="a sentence through 4 hand-built heads: the "
                                            "maps printed, pictures and a head view written",
                               description="Run the demo: 4 hand-built heads on a sentence; "
                                           "prints what each head attends to and writes "
                                           "weights.npy, per-head pictures and a head view.")
    demo.add_argument("outdir", nargs="?", default="attnpy-demo",
                      help="where the pictures go (default: attnpy-demo)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from .demo import run
    run(args.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
