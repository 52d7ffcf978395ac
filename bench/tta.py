"""Time to first audio (TTFA): our streamed spoken reply vs transformers' whole-pipeline `generate(return_audio=True)`.

    python bench/tta.py                      # both families, CPU, one torch thread (~2 min)
    python bench/tta.py --family qwen3 --device cuda --threads 4

What is timed. Ours: `Assistant.chat(speech=True, stream=True)` from the call (prompt template and tokenising
included) to the first audio chunk (`stats["time_to_first_audio"]`), and to the last one. Reference: the
`generate(return_audio=True)` call on the same prepared input tensors; it returns the waveform only when
thinker, talker and vocoder have all finished, so its TTFA is its total time. Both greedy (thinker and
talker), the same reply budget (REPLY_TOKENS) and talker budget (AUDIO_SECONDS), one warm-up run each first.
The table also shows the audio each produced, our real-time factor (speech compute / audio duration) and, for
Qwen2.5, the seam error of our windowed DiT stream against a whole-utterance decode of the same codes with the
same initial noise, and the TTFA of the exact stream (see qwen_omni/speech/qwen25/pipeline.py for why it is not the default).

Shapes ("tiny but realistic"): random weights (they do not change the cost of a step) with the released
models' structure where it decides the time split, and widths a CPU gets through in about a minute:
* Qwen3-Omni: thinker 4 MoE layers (hidden 256, 8 experts top-2); talker 3 MoE layers (hidden 128) with the
  released 16 code groups (15 code-predictor steps per frame, 2 layers); Code2Wav 2 layers, the released
  1920x upsampling (12.5 frames/s) and 72-frame window. Reply 48 tokens, 9.6 s of audio (120 frames).
* Qwen2.5-Omni: thinker 4 layers (hidden 256); talker 3 layers (hidden 128); DiT 6 layers (hidden 128) with the
  released 24-frame blocks, look-back (first, last) / look-ahead (middle) layers and 10 RK4 steps with CFG;
  BigVGAN with the released 240x upsampling (6 stages, 128 initial channels). Reply 48 tokens, 6 s (300 codes).
Greedy random thinkers may stop early; both sides stop at the same token, and the table shows the counts.
One torch thread by default: on a machine busy with other work, more threads made tiny ops much slower.

Measured (2 shared CPU cores, 1 thread, 65 s in all):
    family   side        tokens audio s  TTFA s total s   RTF   TTFA ratio
    qwen3    reference       48    9.58    5.28    5.28     -
    qwen3    ours            48    9.58    0.13    3.33  0.33        40.0x
    qwen2_5  reference       17    6.00   11.96   11.96     -
    qwen2_5  ours            17    6.00    2.03   14.89  2.47         5.9x
    qwen2_5 windowed seam error max 5.4e-05 (audio RMS 0.72); exact stream TTFA 11.61 s
The exact Qwen2.5 stream gains nothing here (300 codes < its 432-code look-ahead), hence the windowed default.
On a CPU the windowed DiT (each window re-integrates its context) makes our total longer than the reference's.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qwen_omni  # noqa: E402
from tests.tiny_speech import make_qwen3_full, make_qwen25_full  # noqa: E402

REPLY_TOKENS = 48
AUDIO_SECONDS = {"qwen3": 9.6, "qwen2_5": 6.0}
ROPE3 = lambda sections: {"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections,  # noqa: E731
                          "interleaved": True}
SHAPES = {
    "qwen3": {
        "thinker_config.text_config": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                           moe_intermediate_size=128, rope_parameters=ROPE3([12, 10, 10])),
        "talker_config": dict(thinker_hidden_size=256, accept_hidden_layer=2, num_code_groups=16),
        "talker_config.text_config": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                          moe_intermediate_size=64, shared_expert_intermediate_size=128,
                                          num_experts=8, rope_parameters=ROPE3([6, 5, 5])),
        "talker_config.code_predictor_config": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                    num_code_groups=16),
        "code2wav_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_quantizers=16,
                                decoder_dim=96, sliding_window=72),
    },
    "qwen2_5": {
        "thinker_config.text_config": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                            "mrope_section": [8, 12, 12]}),
        "talker_config": dict(embedding_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                               "mrope_section": [4, 6, 6]}),
        "token2wav_config.dit_config": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, head_dim=32,
                                            block_size=24, look_ahead_layers=[3], look_backward_layers=[0, 5]),
        "token2wav_config.bigvgan_config": dict(upsample_initial_channel=128, upsample_rates=[5, 3, 2, 2, 2, 2],
                                                upsample_kernel_sizes=[11, 7, 4, 4, 4, 4],
                                                resblock_kernel_sizes=[3, 7, 11],
                                                resblock_dilation_sizes=[[1, 3, 5]] * 3),
    },
}
QUESTION = [{"role": "user", "content": "what is in this picture? describe the image and the audio clip."}]


def greedy(a):
    from qwen_omni.speech.qwen3.talker import PREDICTOR_GREEDY, TALKER_GREEDY
    from qwen_omni.speech.qwen25.talker import TALKER_GREEDY as TALKER25_GREEDY

    e = a.speech.load()
    if a.speech.family == "qwen3":
        e.talker_params, e.predictor_params = TALKER_GREEDY, PREDICTOR_GREEDY
    else:
        e.talker_params = TALKER25_GREEDY
    e.record_codes = []
    return e


def ours(a, tokens: int, seconds: float) -> dict:
    a.speech.pipeline.max_audio_seconds = seconds
    a.prefix_cache.clear()  # every run prefills its prompt, as the reference does
    stats: dict = {}
    t0 = time.perf_counter()
    audio = [x for x in a.chat(QUESTION, max_new_tokens=tokens, temperature=0, stream=True, speech=True, seed=0,
                               stats=stats) if not isinstance(x, str)]
    return dict(tta=stats.get("time_to_first_audio"), total=time.perf_counter() - t0, tokens=stats["completion_tokens"],
                audio=np.concatenate(audio) if audio else np.zeros(0, np.float32), rtf=stats.get("real_time_factor"))


def reference(hf, a, family: str, tokens: int, seconds: float) -> dict:
    from qwen_omni.speech.qwen25.pipeline import persona_in_first_user_turn

    msgs = persona_in_first_user_turn(QUESTION) if family == "qwen2_5" else QUESTION
    ids = a.prepare(msgs)["input_ids"]
    if family == "qwen3":
        kw = dict(speaker="Ethan", talker_max_new_tokens=int(seconds * 12.5) + 1)  # +1: the last code 0 is dropped
    else:
        kw = dict(speaker="Chelsie", talker_max_new_tokens=int(seconds * 50))
    t0 = time.perf_counter()
    with torch.no_grad():
        seq, wav = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), thinker_max_new_tokens=tokens,
                               thinker_do_sample=False, thinker_eos_token_id=a.stop_ids, talker_do_sample=False, **kw)
    dt = time.perf_counter() - t0
    new = [t for t in seq[0, ids.shape[1]:].tolist() if t not in a.stop_ids]  # ours counts no stop token either
    return dict(tta=dt, total=dt, tokens=len(new), audio=wav.reshape(-1).float().numpy(), rtf=None)


def seam_and_exact(a, run: dict, tokens: int, seconds: float) -> tuple[float, float, float | None]:
    """Qwen2.5: (max seam error, audio RMS, exact-stream TTFA) for the codes of `run`."""
    from qwen_omni.engine.generate import make_generator
    from qwen_omni.speech.qwen25.token2wav_stream import FrameNoise

    e = a.speech.pipeline
    codes = e.record_codes[-1]
    spk = e.speakers["Chelsie"]
    noise = FrameNoise(make_generator(0 + 2), e.token2wav.cfg.dit.mel_dim).get(0, 2 * len(codes))  # the stream's
    whole = e.token2wav(torch.tensor([codes]), spk["cond"][None], spk["ref_mel"], noise=noise)[0].numpy()
    seam = float(np.abs(run["audio"] - whole).max())
    e.exact = True
    try:
        exact = ours(a, tokens, seconds)
    finally:
        e.exact = False
    return seam, float(whole.std()), exact["tta"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", default=["qwen3", "qwen2_5"], choices=["qwen3", "qwen2_5"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.family:
            d = Path(tmp) / family
            make = make_qwen3_full if family == "qwen3" else make_qwen25_full
            hf = make(d, seed=2 if family == "qwen3" else 0, overrides=SHAPES[family]).to(args.device)
            a = qwen_omni.load(d, device=args.device, dtype="float32")
            greedy(a)
            secs = AUDIO_SECONDS[family]
            ours(a, 4, 0.5), reference(hf, a, family, 4, 0.5)  # warm-up
            mine, ref = ours(a, REPLY_TOKENS, secs), reference(hf, a, family, REPLY_TOKENS, secs)
            rows.append((family, mine, ref))
            if family == "qwen2_5":
                seam, rms, exact_tta = seam_and_exact(a, mine, REPLY_TOKENS, secs)
                notes.append(f"qwen2_5 windowed DiT stream (speech_pipeline25.WINDOW25): seam error max {seam:.2e} "
                             f"(audio RMS {rms:.3f}); exact stream TTFA {exact_tta:.2f} s")
            del hf, a
    head = (f"{'family':8} {'':10} {'tokens':>6} {'audio s':>7} {'TTFA s':>7} {'total s':>7} {'RTF':>5}   "
            f"{'TTFA ratio':>10}")
    print(head)
    print("-" * len(head))
    for family, mine, ref in rows:
        for name, r in (("reference", ref), ("ours", mine)):
            ratio = f"{ref['tta'] / mine['tta']:>9.1f}x" if name == "ours" and mine["tta"] else ""
            rtf = f"{r['rtf']:.2f}" if r["rtf"] is not None else "-"
            print(f"{family:8} {name:10} {r['tokens']:>6} {r['audio'].size / 24000:>7.2f} {r['tta']:>7.2f} "
                  f"{r['total']:>7.2f} {rtf:>5}   {ratio}")
    for n in notes:
        print(n)
    print(f"(device {args.device}, {args.threads} torch thread(s), {time.perf_counter() - t_start:.0f} s in all; "
          f"target: TTFA ratio >= 3x)")


if __name__ == "__main__":
    main()
