"""How a translation pair becomes tokens for one model: the native GLM layout, or the
prompt an imported ChatGLM model was tuned on. One object serves the training examples
(TranslationDataset) and the decoding prompts (engine/recipe/evaluate.py), so a model is
fine-tuned and evaluated on the same text.

    style     prompt (what generation is fed)                            answer, end
    glm       <en> src [gMASK]   (+ <sop>; glm2d: generate appends it)    tgt <eop>
    chatglm3  [gMASK] sop <|user|> "\\n" INSTRUCTION "\\n" src <|assistant|>  "\\n" tgt </s>
    chatglm2  [gMASK] sop "[Round 1]\\n\\n问：" INSTRUCTION "\\n" src "\\n\\n答："      tgt </s>
    plain     [gMASK] sop INSTRUCTION "\\n" src "\\n"                          tgt </s>

chatglm3 is ChatGLM3's build_chat_input with one user turn (role token, metadata line "",
message) and GLM-4's chat template; the answer's leading "\\n" is the empty metadata line
ChatGLM3 emits before its reply, and generation also stops at <|user|> / <|observation|>
as ChatGLM3's own chat() does. chatglm2 is ChatGLM2's build_prompt. plain is for imported
base (non-chat) ChatGLM models. The source is encoded on its own and concatenated, where
the reference encodes the whole message string: pieces may differ at that one seam.
"""
from __future__ import annotations

from model.masks import IGNORE, GLMExample, blank_infilling_example

INSTRUCTIONS = {"en-zh": "Translate the following English text into Chinese.",
                "zh-en": "Translate the following Chinese text into English."}


class TranslationFormat:
    def __init__(self, tok, config=None):
        """tok: a Tokenizer or ChatGLMTokenizer (the ids a SpecialIds alone, for glm);
        config: the model's GLMConfig (None: a native glm2d model)."""
        kind = getattr(tok, "kind", "glm")
        self.causal = bool(config is not None and config.causal)
        chat = config.chat_format if config is not None else ""
        self.ids = getattr(tok, "special_ids", tok)
        self._answer = []   # answer tokens that belong to the prompt at decode time
        if kind == "glm":
            if chat:
                raise ValueError(f"chat_format={chat!r} needs the model's own ChatGLM "
                                 "tokenizer, not a native GLM tokenizer")
            self.style = "glm"
            self.end_id = self.ids.eop
            self.stop_ids = [self.ids.eop]
            return
        if not self.causal:
            raise ValueError("a ChatGLM tokenizer goes with an imported causal1d model; this "
                             "model's position_layout is glm2d")
        self.style = chat or "plain"
        self.end_id = tok.eos_id
        self.stop_ids = [tok.eos_id]
        head = [tok.gmask_id, tok.sop_id]
        enc = tok.encode
        if self.style == "chatglm3":
            self.stop_ids += [tok.command("<|user|>"), tok.command("<|observation|>")]
            self._before = {d: head + [tok.command("<|user|>")] + enc("\n") + enc(i + "\n")
                            for d, i in INSTRUCTIONS.items()}
            self._after = [tok.command("<|assistant|>")]
            self._answer = enc("\n")
        elif self.style == "chatglm2":
            self._before = {d: head + enc("[Round 1]\n\n问：") + enc(i + "\n")
                            for d, i in INSTRUCTIONS.items()}
            self._after = enc("\n\n答：")
        else:
            self._before = {d: head + enc(i + "\n") for d, i in INSTRUCTIONS.items()}
            self._after = enc("\n")

    def _tag(self, direction: str) -> int:
        if direction not in INSTRUCTIONS:
            raise ValueError(f"direction={direction!r} must be en-zh or zh-en")
        return self.ids.en if direction == "en-zh" else self.ids.zh

    def part_a(self, src: list[int], direction: str) -> list[int]:
        if self.style == "glm":
            return [self._tag(direction)] + list(src) + [self.ids.gmask]
        self._tag(direction)
        return self._before[direction] + list(src) + self._after

    def prompt(self, src: list[int], direction: str = "en-zh") -> list[int]:
        """What generate() is fed. glm2d: Part A (generate appends <sop>); causal: the
        whole prefix up to the first answer token."""
        a = self.part_a(src, direction)
        if self.style == "glm":
            return a + [self.ids.sop] if self.causal else a
        return a + self._answer

    def overhead(self, direction: str = "en-zh") -> int:
        """Tokens the layout adds around source and target (seq_len budget)."""
        return len(self.part_a([], direction)) + len(self._answer) + 1 + (
            1 if self.style == "glm" else 0)   # glm: <sop>

    def example(self, src: list[int], tgt: list[int], direction: str) -> GLMExample:
        a = self.part_a(src, direction)
        if self.style == "glm" and not self.causal:
            return blank_infilling_example(a, [(len(a) - 1, list(tgt))], self.ids.sop,
                                           self.ids.eop)
        # causal 1D: one left-to-right sequence, loss on the answer and its end token
        lead = [self.ids.sop] if self.style == "glm" else []
        answer = lead + self._answer + list(tgt) + [self.end_id]
        ids = a + answer[:-1]
        labels = [IGNORE] * (len(a) - 1) + answer
        # the leading sop / "\n" are part of the prompt at decode time: no loss on them
        for k in range(len(lead) + len(self._answer)):
            labels[len(a) - 1 + k] = IGNORE
        n = len(ids)
        return GLMExample(ids, list(range(n)), [0] * n, labels, 0)
