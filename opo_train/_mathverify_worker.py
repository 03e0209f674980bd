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
    # The first symbolic comparison imports and caches much of sympy (over a second on a busy
    # machine): done here, before "ready", so that it is not charged to an answer's timeout.
    for gold, pred in (("(x+1)^2", "x^2+2x+1"), ("\\frac12", "0.5")):
        verify(parse(f"\\boxed{{{gold}}}", parsing_timeout=None),
               parse(f"\\boxed{{{pred}}}", parsing_timeout=None), timeout_seconds=None)
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
