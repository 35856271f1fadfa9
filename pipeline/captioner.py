"""BLIP image captioning from a local folder: the feedback stage's captioner of instance crops
and the prompts stage's captioner of LQ images (one loader, one decoding)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.devices import resolve_device


class BlipCaptioner:
    """BLIP image captioning from a local ``save_pretrained`` folder (or a cached hub id)."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        prompt: str = "",
        max_new_tokens: int = 30,
        num_beams: int = 1,
        batch_size: int = 8,
    ) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(f"BLIP captioner not found: {path}")
        self.path = str(path)
        self.device = resolve_device(device)
        self.processor = BlipProcessor.from_pretrained(self.path)
        self.model = BlipForConditionalGeneration.from_pretrained(self.path).to(self.device).eval()
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.batch_size = batch_size

    @torch.no_grad()
    def caption(self, crops: Sequence[np.ndarray]) -> list[str]:
        """One caption per uint8 RGB crop (special tokens and the echoed prompt removed)."""
        captions: list[str] = []
        for start in range(0, len(crops), self.batch_size):
            batch = list(crops[start : start + self.batch_size])
            text = [self.prompt] * len(batch) if self.prompt else None
            inputs = self.processor(images=batch, text=text, return_tensors="pt").to(self.device)
            generated = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
                do_sample=False,
            )
            decoded = self.processor.batch_decode(generated, skip_special_tokens=True)
            captions.extend(strip_prompt(text, self.prompt) for text in decoded)
        return captions


def strip_prompt(text: str, prompt: str) -> str:
    """The caption without the conditioning prompt BLIP echoes (case-insensitively: BLIP's
    tokenizer lower-cases), so similarities and negative prompts hold only the description."""
    text = text.strip()
    prompt = prompt.strip()
    if prompt and text.lower().startswith(prompt.lower()):
        return text[len(prompt) :].strip()
    return text
