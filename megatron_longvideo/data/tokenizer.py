"""One small tokenizer interface over a sentencepiece model file or a Hugging Face tokenizer folder.

The prompt builders need: ``encode`` / ``decode`` of plain text (special tokens written in the text,
e.g. ``<|im_start|>``, come out as their single ids), and the ids of the pad, eos, video placeholder
and chat-turn tokens. ``load_tokenizer(path)`` picks the implementation from what ``path`` is.

Which tokens must be single ids: the chat turns, the video placeholder and the family's vision
delimiters (:meth:`SpecialTokens.structural`). The response tags (``<think>``, ``<answer>``) are text
the model writes and the reward reads from decoded text, so a public tokenizer that spells them as
several pieces is fine; the tokenizers trained here make them single pieces anyway.

``train_sentencepiece(texts, model_prefix)`` builds a small model offline in about a second, with the
special tokens as user-defined symbols; ``train_tokenizer_for_records`` feeds it a dataset's text plus
the chat template's, which is what the CPU demo uses.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokens:
    """Spellings of the special tokens the chat template and the model side rely on."""

    im_start: str = "<|im_start|>"
    """Opens a chat turn (Qwen2 / ChatML spelling)."""

    im_end: str = "<|im_end|>"
    """Closes a chat turn; also the end-of-sequence token a rollout stops at."""

    video: str = "<video>"
    """The video placeholder, repeated ``num_video_tokens`` times in a tokenized prompt."""

    vision_start: str | None = None
    """Opens the video span (Qwen2.5-VL: ``<|vision_start|>``); None: the family has no delimiters."""

    vision_end: str | None = None
    """Closes the video span (Qwen2.5-VL: ``<|vision_end|>``)."""

    pad: str = "<|endoftext|>"
    """Padding token, used when the tokenizer defines none."""

    think_start: str = "<think>"
    """Opens the reasoning span of a response."""

    think_end: str = "</think>"
    """Closes the reasoning span."""

    answer_start: str = "<answer>"
    """Opens the final answer span."""

    answer_end: str = "</answer>"
    """Closes the final answer span."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            if not isinstance(value, str) or not value or value.isspace():
                raise ValueError(f"{f.name} must be a non-empty token string, got {value!r}")
        if (self.vision_start is None) != (self.vision_end is None):
            raise ValueError(f"vision_start and vision_end come together, got {self.vision_start!r} and {self.vision_end!r}")
        spellings = self.all()
        if len(set(spellings)) != len(spellings):
            raise ValueError(f"special tokens must be distinct, got {spellings}")

    def all(self) -> list[str]:
        """Every spelling that is set, in field order."""
        return [v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None]

    def structural(self) -> list[str]:
        """The spellings a tokenizer must hold as single tokens: the chat turns, the video placeholder and
        the vision delimiters (the pad is the tokenizer's own when it has one)."""
        return [t for t in (self.im_start, self.im_end, self.video, self.vision_start, self.vision_end) if t is not None]

    def video_item(self) -> str:
        """What a video renders as in a user turn, before the turn's text: ``<video>`` and a newline
        (LLaVA-OneVision's template), or the placeholder between the vision delimiters with the text
        straight after (Qwen2.5-VL's)."""
        if self.vision_start is None:
            return f"{self.video}\n"
        return f"{self.vision_start}{self.video}{self.vision_end}"


_OPTIONAL = ("vision_start", "vision_end")


class Tokenizer:
    """The interface. Subclasses set ``special`` and implement ``_id``, ``encode``, ``decode``."""

    special: SpecialTokens
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added; special tokens in the text map to their ids."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens written out."""
        raise NotImplementedError

    def _id(self, token: str) -> int | None:
        raise NotImplementedError

    def token_id(self, token: str) -> int:
        """The id of a single special token, or ``ValueError`` naming it."""
        tid = self._id(token)
        if tid is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary ({self.source}); "
                             "add it as a special / user-defined token")
        return tid

    @property
    def pad_id(self) -> int:
        return self.token_id(self.special.pad)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.special.im_end)

    @property
    def video_id(self) -> int:
        return self.token_id(self.special.video)

    @property
    def im_start_id(self) -> int:
        return self.token_id(self.special.im_start)

    @property
    def im_end_id(self) -> int:
        return self.token_id(self.special.im_end)

    def check_special_tokens(self) -> None:
        """Raise ``ValueError`` naming the first structural token (and pad) the vocabulary lacks."""
        for token in self.special.structural():
            self.token_id(token)
        self.pad_id  # noqa: B018 (raises when there is no pad)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file. Special tokens must be pieces of the model (user-defined)."""

    def __init__(self, model_path: str, *, special: SpecialTokens | None = None):
        import sentencepiece as spm

        self.source = os.fspath(model_path)
        self.special = special or SpecialTokens()
        self._sp = spm.SentencePieceProcessor(model_file=self.source)
        self.vocab_size = self._sp.get_piece_size()
        self.check_special_tokens()

    def __getstate__(self):  # picklable for spawn-started DataLoader workers
        return {"source": self.source, "special": self.special, "proto": self._sp.serialized_model_proto()}

    def __setstate__(self, state):
        import sentencepiece as spm

        self.source, self.special = state["source"], state["special"]
        self._sp = spm.SentencePieceProcessor(model_proto=state["proto"])
        self.vocab_size = self._sp.get_piece_size()

    def _id(self, token: str) -> int | None:
        tid = self._sp.piece_to_id(token)
        return None if tid == self._sp.unk_id() and token != self._sp.id_to_piece(tid) else tid

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder, loaded with ``AutoTokenizer`` from local files only.

    Missing special tokens (e.g. ``<video>`` in a text-only model's tokenizer) are an error naming the
    token; add them with ``tokenizer.add_special_tokens`` and save the folder again.
    """

    def __init__(self, path: str, *, special: SpecialTokens | None = None):
        from transformers import AutoTokenizer

        self.source = os.fspath(path)
        self.special = special or SpecialTokens()
        self._tok = AutoTokenizer.from_pretrained(self.source, local_files_only=True)
        self.vocab_size = len(self._tok)
        self.check_special_tokens()

    def _id(self, token: str) -> int | None:
        tid = self._tok.convert_tokens_to_ids(token)
        if tid is None or (tid == self._tok.unk_token_id and token != self._tok.unk_token):
            return None
        return tid

    @property
    def pad_id(self) -> int:
        pad = self._tok.pad_token_id
        return pad if pad is not None else self.token_id(self.special.pad)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes (ids 0-255) and the special tokens after them: needs no file and no package.

    For checks and smoke runs on machines without sentencepiece or a tokenizer folder (the GPU check);
    ``load_tokenizer("bytes")`` builds it. Undecodable byte runs decode with replacement characters.
    """

    def __init__(self, *, special: SpecialTokens | None = None):
        self.source = "bytes"
        self.special = special or SpecialTokens()
        self._specials = {tok: 256 + i for i, tok in enumerate(self.special.all())}
        self._by_id = {i: tok for tok, i in self._specials.items()}
        self.vocab_size = 256 + len(self._specials)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True)) + ")")

    def _id(self, token: str) -> int | None:
        return self._specials.get(token)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], bytearray()
        for i in (int(i) for i in ids):
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(self._by_id.get(i, ""))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


def load_tokenizer(path: str, *, special: SpecialTokens | None = None) -> Tokenizer:
    """A sentencepiece ``.model`` file, or a folder holding one HF tokenizer (or one ``.model``), or
    ``"bytes"`` (:class:`ByteTokenizer`)."""
    if path == "bytes":
        return ByteTokenizer(special=special)
    path = os.fspath(path)
    if os.path.isfile(path):
        return SentencePieceTokenizer(path, special=special)
    if os.path.isdir(path):
        names = os.listdir(path)
        if any(n in names for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            return HFTokenizer(path, special=special)
        models = [n for n in names if n.endswith(".model")]
        if len(models) == 1:
            return SentencePieceTokenizer(os.path.join(path, models[0]), special=special)
    raise ValueError(f"{path}: not a sentencepiece .model file nor a Hugging Face tokenizer folder "
                     "(expected tokenizer.json or tokenizer_config.json)")


def train_sentencepiece(texts: Iterable[str], model_prefix: str, *, vocab_size: int = 512,
                        special: SpecialTokens | None = None) -> str:
    """Train a small BPE sentencepiece model on ``texts``; returns the ``.model`` path.

    Byte fallback makes every string encodable; text is kept verbatim (no normalisation, newlines are
    a user-defined piece) so ``decode(encode(t)) == t``. ``vocab_size`` is a soft limit: a corpus too
    small for it gives a smaller vocabulary instead of an error.
    """
    import sentencepiece as spm

    special = special or SpecialTokens()
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 byte pieces + specials), got {vocab_size}")
    symbols = [s for s in special.all() if s != special.pad] + ["\n"]
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=symbols,
        pad_id=0,
        pad_piece=special.pad,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model_prefix + ".model"


def train_tokenizer_for_records(records: Iterable, model_prefix: str, *, vocab_size: int = 512,
                                special: SpecialTokens | None = None, prompt=None) -> str:
    """Train ``train_sentencepiece`` on the prompts and targets the records will produce.

    ``records`` are ``VideoQARecord`` / ``CaptionRecord`` objects; the chat template's own text
    (system prompt, instructions) is included by rendering each record's prompt and target.
    """
    from megatron_longvideo.data.prompts import PromptConfig, render_example_text

    prompt = prompt or PromptConfig()
    special = special or SpecialTokens()
    texts = []
    for rec in records:
        texts.extend(render_example_text(rec, prompt, special))
    return train_sentencepiece(texts, model_prefix, vocab_size=vocab_size, special=special)
