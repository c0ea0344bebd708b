"""The reference the exactness claims are checked against: a row run alone through `transformers` directly.

`inputs_embeds` is the prompt followed by the embedded input (`</s>` included), with a mask of ones, in a batch
of one. So the reference shares none of `FrozenT5`'s layout, encoding, decoding or scoring code, and a mistake
there cannot hide on both sides. Used by the tests and by `bench/gpu_check.py`.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from server.serving.model import FrozenT5, Row


def random_prompt(length: int, d_model: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(length, d_model, generator=generator) * scale


INPUTS = [
    "sentence: a gorgeous, witty film",
    "premise: the cat sat on the mat. hypothesis: a cat is sitting",
    "x",
    "question: which of these rows came first, and does it matter at all?",
    "sentence: dull",
    "translate: the quick brown fox jumps over the lazy dog",
]
PROMPT_LENGTHS = [1, 5, 20, 7, 20, 13]  # 6 tasks, 5 different lengths
TOLERANCE = 1e-4


def mixed_rows(model: FrozenT5) -> list[Row]:
    ids = model.tokenize(INPUTS)
    prompts = [random_prompt(n, model.d_model, seed=task) for task, n in enumerate(PROMPT_LENGTHS)]
    return [Row(model.prompt_on_device(p), i) for p, i in zip(prompts, ids, strict=True)]


class Alone:
    """One row run alone through `transformers` directly: the reference every batched result must equal."""

    def __init__(self, model: FrozenT5, row: Row) -> None:
        self.hf = model.model
        self.eos = self.hf.config.eos_token_id
        ids = torch.tensor([row.input_ids], device=model.device)
        self.embeds = torch.cat([row.prompt, self.hf.get_input_embeddings()(ids)[0]])[None]
        self.mask = torch.ones(self.embeds.shape[:2], dtype=torch.long, device=model.device)
        # ids the tokenizer cannot decode are never generated (a checkpoint's vocabulary is padded past it)
        self.undecodable = list(range(len(model.tokenizer), self.hf.config.vocab_size)) or None

    @torch.inference_mode()
    def encoder_output(self) -> torch.Tensor:
        return self.hf.encoder(inputs_embeds=self.embeds, attention_mask=self.mask).last_hidden_state[0]

    @torch.inference_mode()
    def first_step_logits(self) -> torch.Tensor:
        start = torch.tensor([[self.hf.config.decoder_start_token_id]], device=self.embeds.device)
        return self.hf(inputs_embeds=self.embeds, attention_mask=self.mask, decoder_input_ids=start).logits[0, 0]

    @torch.inference_mode()
    def generate(self, max_new_tokens: int, num_beams: int = 1) -> list[int]:
        """`model.generate`'s tokens after the start token, up to and including `</s>`."""
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=self.eos,
            pad_token_id=self.hf.config.pad_token_id,
            decoder_start_token_id=self.hf.config.decoder_start_token_id,
            suppress_tokens=self.undecodable,
        )
        tokens = self.hf.generate(inputs_embeds=self.embeds, attention_mask=self.mask, generation_config=config)
        tokens = tokens[0, 1:].tolist()
        return tokens[: tokens.index(self.eos) + 1] if self.eos in tokens else tokens

    @torch.inference_mode()
    def score(self, label: list[int]) -> float:
        """Summed log-probability of the label's tokens (`</s>` included), from a plain forward with `labels`."""
        labels = torch.tensor([label], device=self.embeds.device)
        logits = self.hf(inputs_embeds=self.embeds, attention_mask=self.mask, labels=labels).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[0, :, None]).sum().item()
