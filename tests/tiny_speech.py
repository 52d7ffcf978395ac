"""Tiny random FULL Omni checkpoints (thinker + talker + vocoder) that `qwen_omni.load` can chat with.

Built by transformers' own classes and saved with `save_pretrained`, like tests/test_speech3.py and
tests/test_speech25.py build theirs, but with a tokenizer whose ids the configs use, so the whole chat path
(template, processor, thinker, talker, vocoder) runs:
* Qwen3-Omni: the talker decides each token's role from the token after `<|im_start|>`, so the tokenizer has
  `system` / `user` / `assistant` as single (special) tokens, and the three tts tokens; the config's
  im_start / role / tts ids point at them. Talker and Code2Wav as in test_speech3 (Code2Wav weights spread
  so the clip is a real signal), voices chelsie / ethan / aiden (lower case, as released).
* Qwen2.5-Omni: test_speech25's checkpoint (its tokenizer, talker, DiT, BigVGAN, spk_dict.pt).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny_omni import (Q3_CODE2WAV, Q3_TALKER, init_stacked_experts, part, save_tokenizer,  # noqa: E402
                        thinker_config)

Q3_EXTRA = ["system", "user", "assistant", "<tts_pad>", "<tts_bos>", "<tts_eos>"]
PREPROCESSOR = {"merge_size": 2, "temporal_patch_size": 2, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280,
                "feature_size": 128, "sampling_rate": 16000, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}


def resized(cfg, overrides: dict | None):
    """`cfg` (a transformers config) with {"dotted.sub_config": {field: value}} updates applied."""
    if not overrides:
        return cfg
    d = cfg.to_dict()
    for path, fields in overrides.items():
        node = d
        for key in path.split("."):
            node = node[key]
        node.update(fields)
        n = fields.get("num_hidden_layers")
        if n is not None and node.get("layer_types") and "layer_types" not in fields:
            node["layer_types"] = [node["layer_types"][0]] * n  # one attention type per layer
    return type(cfg).from_dict(d)


def make_qwen3_full(d: Path, seed: int = 0, overrides: dict | None = None):
    """Save a tiny full Qwen3-Omni checkpoint with tokenizer; return the transformers model (ready to generate).

    overrides: see `resized` (bench/tta.py makes wider, more realistic shapes with it)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from .test_speech3 import spread_code2wav

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(d, "qwen3", tuple(Q3_EXTRA))
    th = thinker_config("qwen3", ids)
    cfg = Qwen3OmniMoeConfig(
        thinker_config=th.to_dict(),
        talker_config=part(
            Q3_TALKER, audio_token_id=ids["audio"], image_token_id=ids["image"], video_token_id=ids["video"],
            audio_start_token_id=ids["audio_start"], vision_start_token_id=ids["vision_start"],
            speaker_id={"chelsie": 2301, "ethan": 2302, "aiden": 2303}),
        code2wav_config=part(Q3_CODE2WAV),
        im_start_token_id=ids["<|im_start|>"], im_end_token_id=ids["<|im_end|>"], system_token_id=ids["system"],
        user_token_id=ids["user"], assistant_token_id=ids["assistant"], tts_pad_token_id=ids["<tts_pad>"],
        tts_bos_token_id=ids["<tts_bos>"], tts_eos_token_id=ids["<tts_eos>"])
    torch.manual_seed(seed)
    hf = Qwen3OmniMoeForConditionalGeneration(resized(cfg, overrides)).eval()
    init_stacked_experts(hf)
    with torch.no_grad():  # a thinker whose logits depend visibly on its input, as tiny_omni.make_thinker does
        for name, p in hf.thinker.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.08)
    spread_code2wav(hf.code2wav)
    hf.save_pretrained(d)
    hf.talker.config.audio_config = hf.config.thinker_config.audio_config  # transformers 5.24 workaround
    (d / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16, **PREPROCESSOR}))
    return hf


def make_qwen25_full(d: Path, seed: int = 0, overrides: dict | None = None):
    """Save test_speech25's tiny full Qwen2.5-Omni checkpoint (tokenizer, spk_dict.pt); return the HF model."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    from .test_speech25 import full_config, spread

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(d, "qwen2_5")
    torch.manual_seed(seed)
    hf = Qwen2_5OmniForConditionalGeneration(resized(full_config(ids), overrides)).eval()
    spread(hf)
    hf.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14, **PREPROCESSOR}))
    g = torch.Generator().manual_seed(1)
    torch.save({"Chelsie": {"bos_token": 595, "cond": torch.randn(16, generator=g),
                            "ref_mel": torch.randn(1, 40, 80, generator=g)},
                "Ethan": {"bos_token": 596, "cond": torch.randn(16, generator=g),
                          "ref_mel": torch.randn(50, 80, generator=g)}}, d / "spk_dict.pt")
    hf.load_speakers(str(d / "spk_dict.pt"))
    return hf
