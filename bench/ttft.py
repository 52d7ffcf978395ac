"""Time to first token of a Qwen2.5-Omni thinker: ours vs transformers, one 640x480 image + 10 s of audio.

    python bench/ttft.py                  # ~2 min on 2 (busy) CPU cores, ~3.5 GB RSS + 2.4 GB in /dev/shm
    python bench/ttft.py --runs 5 --threads 2

What is timed (wall clock, from the request to the first generated token, everything in between included):
- ours: `Assistant.chat(messages, stream=True)` until the first text piece (image conversion, log-mel, template,
  placeholder expansion, TMRoPE positions, both encoders, prefill, first sample). The prefix cache is cleared
  before every run, so nothing is reused between runs.
- reference: transformers 5.24 `Qwen2_5OmniProcessor` (the no-video subclass of the reference probe, since
  torchvision is absent; `Qwen2VLImageProcessorPil` + `WhisperFeatureExtractor(feature_size=128)`),
  `apply_chat_template` + processor call, then `Qwen2_5OmniThinkerForConditionalGeneration.generate(do_sample=False)`
  with a streamer whose second `put` (the first is the prompt) is the first new token. A first-token *streamer*
  event is used rather than `TextIteratorStreamer`'s first text, which waits for a word boundary (one more token).
Both get the same in-memory inputs (a PIL image, a 16-kHz float32 array), so file decoding is not timed on
either side; both run float32 on CPU with the same torch thread count. One warm-up request each (a small
image and 1 s of audio: first-call costs, at a fraction of the time), then `--runs` timed runs; the best and the
median are printed, and the ratio ours / reference of the medians. The first token of both is checked to be the
same (same weights, so it must be).

Model (random weights built by transformers' own class, `save_pretrained` to a temp dir, ours loaded from it):
tiny in depth, real in width, so per-layer costs are those of Qwen2.5-Omni-3B (0.59 B parameters, 0.31 B of
them the embedding):
- vision: the Qwen2.5-Omni ViT width (hidden 1280, 16 heads, MLP 3420, patch 14, window 112, merge 2), 2 blocks
  instead of 32: block 0 with window attention, block 1 with full attention (as 7/15/23/31 are), out 2048;
- audio: the Whisper-style encoder width (d_model 1280, 20 heads, FFN 5120, 128 mels), 2 layers instead of 32;
- text: 2 layers of Qwen2.5-3B (hidden 2048, 16 heads / 2 KV heads of 128, MLP 11008, vocab 151936, tied
  embeddings as in Qwen2.5-3B, MRoPE sections [16, 24, 24]).
Depth 2 rather than 4 in the encoders keeps the whole script under 3 minutes on 2 shared cores; a deeper model
scales both sides alike (the layers are the same). Weights are N(0, 0.02) values tiled from one random buffer
(drawing 0.6 B normals takes longer than everything else; the values do not change the cost), norms are 1.
The image gives 391 placeholder tokens (grid 1x34x46), the audio 250; the prompt is 665 tokens. The tokenizer is
a word-level one over the full 151936-id vocabulary with the real Qwen special-token ids, so every generated id
decodes to a non-empty piece (ours yields its first piece with its first token). Peak RAM: one model at a time
(the reference is timed, freed, then ours is loaded).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# transformers imports torchaudio when installed, and the installed wheel cannot load with this torch.
import transformers.utils as _tu  # noqa: E402
import transformers.utils.import_utils as _tiu  # noqa: E402

_tu.is_torchaudio_available = lambda: False
_tiu.is_torchaudio_available = lambda: False

from tests.tiny_omni import Q25_TEMPLATE  # noqa: E402

VOCAB = 151936
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
            "<|audio_bos|>": 151647, "<|audio_eos|>": 151648, "<|vision_bos|>": 151652, "<|vision_eos|>": 151653,
            "<|IMAGE|>": 151655, "<|VIDEO|>": 151656}
NAMED = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
         "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
         "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
NEW_TOKENS = 4  # generation goes on after the first token, as in a real chat; only the first is timed


def thinker_config():
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=1280, encoder_layers=2, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=2048),
        vision_config=dict(depth=2, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=2048,
                           fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=VOCAB, hidden_size=2048, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        audio_token_index=SPECIALS["<|AUDIO|>"], image_token_index=SPECIALS["<|IMAGE|>"],
        video_token_index=SPECIALS["<|VIDEO|>"], audio_start_token_id=SPECIALS["<|audio_bos|>"],
        audio_end_token_id=SPECIALS["<|audio_eos|>"], vision_start_token_id=SPECIALS["<|vision_bos|>"],
        vision_end_token_id=SPECIALS["<|vision_eos|>"], position_id_per_seconds=25, seconds_per_chunk=2,
        tie_word_embeddings=True)


def save_tokenizer(d: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    by_id = {i: t for t, i in SPECIALS.items()}
    vocab = {by_id.get(i, f"w{i}"): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": Q25_TEMPLATE}))


def build_checkpoint(d: Path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.initialization import no_init_weights

    with no_init_weights():
        hf = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config()).eval()
    hf.tie_weights()
    # a prime-length buffer, so that no two rows of a matrix get the same values
    base = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.no_grad():
        for name, p in hf.named_parameters():
            flat = p.view(-1)
            if "norm" in name or "ln_" in name:
                flat.fill_(1.0) if name.endswith("weight") else flat.zero_()
                continue
            for i in range(0, flat.numel(), base.numel()):
                chunk = flat[i:i + base.numel()]
                chunk.copy_(base[:chunk.numel()])
    hf.save_pretrained(d)
    save_tokenizer(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [SPECIALS["<|im_end|>"]]}))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 1280, "feature_size": 128, "sampling_rate": 16000}))
    return hf


def reference_processor(d: Path):
    from transformers import PreTrainedTokenizerFast, Qwen2_5OmniProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import OmniModalProcessorMixin

    class NoVideoQwen2_5OmniProcessor(Qwen2_5OmniProcessor):
        """The reference processor minus its (torchvision-only) video processor."""

        def __init__(self, image_processor=None, feature_extractor=None, tokenizer=None, chat_template=None):
            OmniModalProcessorMixin.__init__(self, image_processor, feature_extractor, tokenizer,
                                             chat_template=chat_template)
            for a in ("image_token", "audio_token", "video_token", "image_token_id", "audio_token_id",
                      "video_token_id", "vision_bos_token", "vision_eos_token", "audio_bos_token",
                      "audio_eos_token"):
                setattr(self, a, getattr(self.tokenizer, a))

    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), extra_special_tokens=NAMED)
    return NoVideoQwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessorPil(),
                                       feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
                                       chat_template=Q25_TEMPLATE)


def inputs(width: int = 640, height: int = 480, seconds: float = 10.0):
    from PIL import Image

    rng = np.random.default_rng(0)
    # a smooth picture with some texture: content does not change the cost, only the size does
    yy, xx = np.mgrid[0:height, 0:width]
    img = (np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), (xx + yy) % 256], -1)
           + rng.integers(0, 32, (height, width, 3)))
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    t = np.arange(int(seconds * 16000)) / 16000
    wav = (0.3 * np.sin(2 * np.pi * (200 + 40 * t) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "audio", "audio": wav},
                                             {"type": "text", "text": "describe the picture and the sound"}]}]
    return messages, image, wav


def time_reference(hf, proc, requests, runs: int):
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.puts, self.at, self.token = 0, None, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:  # put 1 is the prompt
                self.at, self.token = time.perf_counter(), int(value.reshape(-1)[0])

        def end(self):
            pass

    times, first, n_prompt = [], None, None
    for i in range(runs + 1):
        messages, image, wav = requests[min(i, 1)]  # request 0 is the small warm-up
        t0 = time.perf_counter()
        text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = proc(text=[text], images=[image], audio=[wav], return_tensors="pt")
        streamer = FirstToken()
        hf.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS, streamer=streamer)
        if i:  # run 0 is the warm-up
            times.append(streamer.at - t0)
        first, n_prompt = streamer.token, batch["input_ids"].shape[1]
    return times, first, n_prompt


def time_ours(assistant, requests, runs: int):
    assistant.stop_ids = []  # a random model may well pick <|im_end|> first: time a token in any case
    times, piece, stats = [], None, {}
    for i in range(runs + 1):
        messages = requests[min(i, 1)][0]  # request 0 is the small warm-up
        assistant.prefix_cache.clear()  # nothing reused between runs
        t0 = time.perf_counter()
        stream = assistant.chat(messages, stream=True, max_new_tokens=NEW_TOKENS, stats=stats)
        piece = next(stream)
        dt = time.perf_counter() - t0
        stream.close()
        if i:
            times.append(dt)
    assistant.prefix_cache.clear()
    return times, piece, stats["prompt_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2, help="timed runs per side (after one small warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import qwen_omni

    requests = [inputs(112, 84, 1.0), inputs()]
    shm = Path("/dev/shm")  # RAM-backed where there is one: writing 2.7 GB to disk is slow
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        hf = build_checkpoint(d)
        print(f"built + saved the checkpoint in {time.perf_counter() - t0:.1f} s "
              f"({sum(p.numel() for p in hf.parameters()) / 1e6:.0f} M parameters), {torch.get_num_threads()} threads")
        ref_times, ref_token, ref_n = time_reference(hf, reference_processor(d), requests, args.runs)
        del hf
        gc.collect()
        assistant = qwen_omni.load(d, device="cpu", dtype="float32")
        our_times, our_piece, our_n = time_ours(assistant, requests, args.runs)
        same = our_piece.strip() == assistant.tokenizer.decode([ref_token], skip_special_tokens=True).strip()

    def show(name, ts):
        print(f"{name:10s} TTFT best {min(ts):6.3f} s   median {statistics.median(ts):6.3f} s   "
              f"runs {', '.join(f'{t:.3f}' for t in ts)}")

    print(f"prompt: one 640x480 image + 10 s audio -> {our_n} tokens (reference {ref_n})")
    show("reference", ref_times)
    show("ours", our_times)
    ratio = statistics.median(our_times) / statistics.median(ref_times)
    speed = f"{1 / ratio:.2f}x faster" if ratio < 1 else f"{ratio:.2f}x slower"
    print(f"ratio ours / reference (median TTFT) = {ratio:.2f}  (ours {speed}); "
          f"same first token: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
