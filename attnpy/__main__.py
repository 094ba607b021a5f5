"""python -m attnpy demo [OUTDIR]"""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "demo" or len(argv) > 2:
        print("usage: python -m attnpy demo [OUTDIR]", file=sys.stderr)
        return 2
    from .demo import run
    run(argv[1] if len(argv) > 1 else "attnpy-demo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
