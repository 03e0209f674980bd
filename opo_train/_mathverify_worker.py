"""math-verify worker: reads ``[gold, pred]`` JSON lines on stdin, writes 1.0 / 0.0 per line.

Started by ``opo_train.rewards`` as ``python _mathverify_worker.py`` (a plain script: it imports
neither torch nor the caller's ``__main__``). The parent kills it when an answer runs past its
timeout, so math-verify's own (signal-based) timeouts are off.
"""
import json
import logging
import sys


def main() -> None:
    logging.disable(logging.WARNING)  # "Timeout is disabled ..." on every call: we time out outside
    from math_verify import parse, verify
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            gold, pred = json.loads(line)
            g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
            p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
            ok = bool(g and p and verify(g, p, timeout_seconds=None))
        except Exception:  # a parse failure is a wrong answer
            ok = False
        print("1.0" if ok else "0.0", flush=True)


if __name__ == "__main__":
    main()
