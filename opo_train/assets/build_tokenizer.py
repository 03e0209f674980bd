"""How ``tiny_qwen3/tokenizer.json`` was built (run once; the file is shipped, not rebuilt).

A character-level tokenizer over printable ASCII: 3 special tokens (pad = 0, eos = 1, unk = 2)
and 97 characters, so the tiny model can read the toy tasks and MATH-style text alike.
    python opo_train/assets/build_tokenizer.py
"""
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|unk|>"]


def build() -> Tokenizer:
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()  # join without spaces
    tok.add_special_tokens(SPECIALS)
    return tok


if __name__ == "__main__":
    out = Path(__file__).parent / "tiny_qwen3" / "tokenizer.json"
    build().save(str(out))
    print(f"wrote {out}")
