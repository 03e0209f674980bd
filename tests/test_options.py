"""The declarations of opo_kernels.options: the contract's generated tables match them, the typed
objects and the trainer / TRL / verl keys are made from them, and no module outside the loss
definitions asks which loss is which by name."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from opo_kernels import options as O

ROOT = Path(__file__).resolve().parents[1]


def test_contract_tables_are_the_generated_ones():
    """docs/contract.md's options and loss-type tables equal the ones generated from the
    declarations (regenerate: python -m opo_kernels.options docs/contract.md)."""
    text = (ROOT / "docs" / "contract.md").read_text()
    assert O.render_tables(text) == text


def test_render_tables_rewrites_a_stale_table():
    stale = "a\n<!-- generated: options -->\n| old |\n<!-- end generated: options -->\nb\n" \
            "<!-- generated: loss-types -->\n<!-- end generated: loss-types -->\n"
    out = O.render_tables(stale)
    assert "| old |" not in out and O.options_table() in out and O.loss_types_table() in out
    with pytest.raises(ValueError, match="loss-types"):
        O.render_tables("<!-- generated: options --><!-- end generated: options -->")


def test_typed_objects_are_the_declarations():
    lo = {f.name: f.default for f in dataclasses.fields(O.LossOptions)}
    assert lo == {o.name: o.default for o in O.LOSS_OPTIONS}
    bo = {f.name: f.default for f in dataclasses.fields(O.BackendOptions)}
    assert bo == {o.name: o.default for o in O.BACKEND_OPTIONS}
    with pytest.raises(dataclasses.FrozenInstanceError):
        O.LossOptions().alpha = 0.5


@pytest.mark.parametrize("loss", O.LOSSES)
def test_every_loss_and_weighting_has_one_loss_type(loss):
    """Every value of loss (and, for OPO, of escort and level) selects exactly one entry."""
    for escort in O.ESCORTS:
        for level in ("sequence", "token"):
            o = O.LossOptions(loss=loss, escort=escort, level=level)
            hits = [t for t in O.LOSS_TYPES if t.loss == loss and
                    all(getattr(o, k) == v for k, v in t.when)]
            if loss == "opo" or (escort, level) == ("paper", "sequence"):
                assert hits == [o.kind], (loss, escort, level)


def test_is_mode_parses_every_value():
    assert O.is_mode(None) is None
    got = {m: O.is_mode(m) for m in O.IS_MODES}
    assert got == {"token_truncate": O.ISMode(False, True), "token_mask": O.ISMode(False, False),
                   "sequence_truncate": O.ISMode(True, True), "sequence_mask": O.ISMode(True, False)}


def test_trainer_trl_and_verl_keys_come_from_the_declarations():
    pytest.importorskip("yaml")
    import opo_train.config as C
    keys = {o.name for o in O.LOSS_OPTIONS if o.trainer}
    assert keys <= set(C.LOSS_OPTION_KEYS)
    hints = C._HINTS
    for o in O.LOSS_OPTIONS:
        if o.trainer:
            assert hints[o.name] == o.rule.hint() and getattr(C.Config(), o.name) == o.default
            assert o.doc in C.key_docs()[o.name][1]


def test_no_loss_is_asked_for_by_name_outside_its_definitions():
    """Which loss is which is asked of the loss-type table (LossOptions.kind), not by comparing
    loss names: outside the declarations (options.py) nothing in opo_kernels or opo_train writes
    ``loss ==`` / ``loss in`` / ``loss not in`` / ``loss !=``, nor parses is_correction's string."""
    pat = re.compile(r"\bloss\s*(==|!=|in\b|not in\b)|is_correction[^\n]*\.(startswith|endswith)")
    hits = []
    for d in ("opo_kernels", "opo_train"):
        for p in (ROOT / d).rglob("*.py"):
            if p.name == "options.py":
                continue
            for i, code in _code_lines(p.read_text()):
                if pat.search(code) and not re.search(r"\bfor\s+\w+\s+in\b", code):
                    hits.append(f"{p.relative_to(ROOT)}:{i}: {code.strip()}")
    assert not hits, "\n".join(hits)


def _code_lines(src: str):
    """(line number, the line's code with strings and comments blanked)."""
    import io
    import tokenize
    lines = src.splitlines()
    blank = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            for r in range(tok.start[0], tok.end[0] + 1):
                line = blank.get(r, lines[r - 1])
                c0 = tok.start[1] if r == tok.start[0] else 0
                c1 = tok.end[1] if r == tok.end[0] else len(line)
                blank[r] = line[:c0] + " " * (c1 - c0) + line[c1:]
    return [(i, blank.get(i, line)) for i, line in enumerate(lines, 1)]
