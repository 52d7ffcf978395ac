"""Training and checkpoint format of the tiny thinker (a micro-sized model; about a minute on 2 cores).

- the HF-format export has exactly transformers' thinker keys (per-expert MoE tensors), and `qwen_omni.load` and
  `Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained` read it to the same logits and greedy answers;
- a few optimiser steps reduce the loss on a fixed batch; batches of several samples (images, audio, video
  with its sound) go through one forward;
- an interrupted run resumes from its checkpoint; `--init` + `--train projectors` on a JSONL folder only
  changes the projectors.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_omni.train import tiny_model as tm
from qwen_omni.train import loop as T
from qwen_omni.train import stages
from qwen_omni.train.losses import RouterLogits, lm_loss
from qwen_omni.train import data as D
from qwen_omni.synthetic.tasks import make_sample

TASKS_MIX = ("colour", "beep_count", "video_beeps", "followup")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("micro")
    tok = tm.train_tokenizer(tm.corpus_texts(n_per_task=4), vocab_size=400)
    model = tm.new_model(tok.get_vocab_size(), "micro", seed=0)
    with torch.no_grad():  # spread the weights so that a miswired part shows in the logits
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    tm.save_pretrained(model, None, d, tok=tok)
    return d, model


def test_export_has_transformers_keys(ckpt, tmp_path):
    from safetensors import safe_open
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    d, _ = ckpt

    def keys(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    ours = keys(d)
    cfg = Qwen3OmniMoeThinkerConfig(**json.loads((d / "config.json").read_text()))
    Qwen3OmniMoeThinkerForConditionalGeneration(cfg).save_pretrained(tmp_path)  # what transformers writes
    assert ours == keys(tmp_path)
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in ours and "lm_head.weight" in ours
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "generation_config.json"):
        assert (d / name).is_file(), name
    assert json.loads((d / "config.json").read_text())["model_type"] == "qwen3_omni_moe_thinker"


def test_bfloat16_export_loads_as_float32(ckpt, tmp_path):
    """--out-dtype bfloat16 halves the file; `qwen_omni.load` on CPU computes in float32 from the rounded values."""
    from safetensors import safe_open

    d, model = ckpt
    tm.save_pretrained(model, d, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((d / "config.json").read_text())["dtype"] == "float32"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    half, full = tm.load_model(tmp_path), tm.load_model(d)
    assert next(half.parameters()).dtype == torch.float32
    for (name, a), b in zip(half.state_dict().items(), full.state_dict().values()):
        assert torch.equal(a, b.to(torch.bfloat16).float()), name


def _hf_greedy(hf, inp, steps: int, stop: set[int], use_audio_in_video: bool = False) -> list[int]:
    """Greedy decoding with transformers by re-running the whole sequence (positions from its get_rope_index)."""
    ids = inp["input_ids"]
    media = {k: inp[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                 "video_second_per_grid", "input_features", "feature_attention_mask") if k in inp}
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_audio_in_video=use_audio_in_video,
                        **media).logits
        t = int(logits[0, -1].argmax())
        out.append(t)
        if t in stop:
            break
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out


def test_ours_and_transformers_agree(ckpt):
    import qwen_omni
    from transformers import AutoTokenizer, Qwen3OmniMoeThinkerForConditionalGeneration

    d, _ = ckpt
    bot = qwen_omni.load(d)
    hf = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(d).eval()
    for task in ("colour", "beep_count", "video_direction", "chitchat"):
        s = make_sample(task, 5)
        inp = bot.prepare(s.messages)
        with torch.no_grad():
            ours = bot.model(inp)
            kw = {k: v for k, v in inp.items() if k not in ("position_ids", "rope_deltas", "cache_key")}
            ref = hf(**kw, attention_mask=torch.ones_like(inp["input_ids"])).logits
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        reply_ids = bot.tokenizer.encode(bot.chat(s.messages, max_new_tokens=6))
        hf_ids = _hf_greedy(hf, inp, 6, set(bot.stop_ids))
        assert bot.tokenizer.decode(hf_ids, skip_special_tokens=True) == bot.tokenizer.decode(reply_ids), task
    tk = AutoTokenizer.from_pretrained(d)
    text = "What colour is the star? 357"
    assert tk.encode(text, add_special_tokens=False) == bot.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert tk.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == bot.tokenizer.render(msgs)


def test_batched_steps_reduce_loss(ckpt):
    d, _ = ckpt
    torch.manual_seed(0)
    model = tm.load_model(d)
    tok_dir = d
    from qwen_omni.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    proc = tm.processor_for(model.cfg)
    items = [D.encode(proc, tok, s.messages, s.answer) for s in (make_sample(t, 11) for t in TASKS_MIX)]
    batch = D.collate(items)
    assert batch["input_ids"].shape[0] == 4 and "input_features" in batch and "pixel_values_videos" in batch
    # each row's loss in the batch equals its loss alone (padding and media order are right)
    model.eval()
    with torch.no_grad():
        lb = model(batch)
        for i, x in enumerate(items):
            n = x["input_ids"].shape[1]
            torch.testing.assert_close(lb[i:i + 1, :n], model(x), atol=2e-4, rtol=1e-4)
    model.train()
    router = RouterLogits(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, n = lm_loss(model.lm_head, model.hidden(batch), batch["labels"])
        aux = router.aux_loss()
        assert n > 4 and 0.5 < float(aux.detach()) < 8.0
        opt.zero_grad()
        (loss + 0.01 * aux).backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def _args(run, *extra):
    return T.parse_args(["--run", str(run), "--size", "micro", "--vocab", "400", "--batch", "2", "--steps-a", "2",
                         "--steps", "4", "--eval-every", "0", "--ckpt-every", "1", "--log-every", "1", "--no-tqdm",
                         "--augment", "0", *extra])


def test_inline_stream_keeps_the_trainers_threads_and_follows_the_curriculum(ckpt):
    """The synthetic stream runs in the trainer's process (workers=0): it must not change torch's thread count
    (it once set 1, and training ran on one of two cores), and `easy_p` set between batches takes effect."""
    d, model = ckpt
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ds = D.SyntheticStream(d, model.config_dict, {"colour": 1.0}, 4, seed=0, augment_p=0.0, easy_p=1.0)
        it = iter(ds)
        easy = next(it)
        assert torch.get_num_threads() == 2
        ds.easy_p = 0.0
        hard = [next(it) for _ in range(3)]
        n_img = [int(b["image_grid_thw"].shape[0]) for b in [easy, *hard]]
        assert n_img == [4, 4, 4, 4]  # one image per row either way; what changes is its content
        assert stages.easy_share(0.7, "a", 0.0) == 0.7 and stages.easy_share(0.7, "b", 0.5) == 0.0
        assert abs(stages.easy_share(0.7, "a", 1.0) - stages.easy_share(0.7, "b", 0.0)) < 1e-9  # continuous across stages
    finally:
        torch.set_num_threads(before)


def test_length_buckets_hold_the_same_samples_with_less_padding(ckpt):
    """`bucket=4` yields the same 4 batches' worth of samples as `bucket=1`, regrouped by length: each batch is a
    contiguous run of the sorted lengths, and the padded positions in all go down."""
    d, model = ckpt
    mix = {"colour": 1.0, "chitchat": 1.0, "video_beeps": 1.0, "followup": 1.0}

    def first(bucket):
        ds = D.SyntheticStream(d, model.config_dict, mix, 4, seed=3, augment_p=0.0, bucket=bucket)
        it = iter(ds)
        return [next(it) for _ in range(4)]

    def lengths(b):  # real tokens per row: pads are 0 and follow the last real token
        return sorted(int((row != 0).nonzero().max()) + 1 for row in b["input_ids"])

    plain, bucketed = first(1), first(4)
    assert sorted(n for b in plain for n in lengths(b)) == sorted(n for b in bucketed for n in lengths(b))
    runs = sorted((lengths(b) for b in bucketed), key=lambda r: r[0])
    assert all(a[-1] <= b[0] for a, b in zip(runs, runs[1:]))  # no overlap between batches' length ranges
    padded = [sum(b["input_ids"].numel() for b in bs) for bs in (plain, bucketed)]
    assert padded[1] < padded[0]


def test_mix_reweights_stage_b_and_rejects_unknown_tasks(ckpt, capsys):
    """`--mix shape=...` changes only the named weights of the stage (b) stream; a misspelt task stops the run."""
    d, model = ckpt
    args = T.parse_args(["--mix", "shape=4,pitch=0", "--batch", "2"])
    assert args.mix == {"shape": 4.0, "pitch": 0.0}
    _, ds = stages.make_loader(args, "b", d, model, seed=0)
    assert ds.weights == {**D.STAGE_B_WEIGHTS, "shape": 4.0, "pitch": 0.0}
    _, ds_a = stages.make_loader(args, "a", d, model, seed=0)
    assert ds_a.weights == D.STAGE_A_TASKS  # stage (a) keeps its own mix
    with pytest.raises(SystemExit):
        T.parse_args(["--mix", "shapes=2"])
    assert "'shapes=2': expected TASK=WEIGHT" in capsys.readouterr().err


def test_initialisation_keeps_the_audio_signal():
    """From scratch the audio front end must pass the mel signal on at a scale comparable to the sinusoidal
    positions it is added to (N(0, 0.02) convs once shrank it ~1e4-fold and audio never learned)."""
    model = tm.new_model(400, "tiny", seed=0)
    at = model.audio_tower
    out = {}
    at.conv_out.register_forward_hook(lambda mod, i, o: out.__setitem__("conv_out", o))
    x = make_sample("pitch", 0, "train").messages[0]["content"][0]["audio"][1]
    from encoders.preprocess import log_mel

    f, n = log_mel(torch.from_numpy(x), n_mels=128)
    with torch.no_grad():
        at(f, torch.tensor([n]))
    assert out["conv_out"].std() > 0.1 * at.positional_embedding.std(), out["conv_out"].std()


def test_resume_continues_from_checkpoint(tmp_path, ckpt, monkeypatch):
    d, _ = ckpt
    monkeypatch.setattr(tm, "corpus_texts", lambda *a, **k: _small_corpus())  # a fast tokenizer for the test
    run = tmp_path / "run"
    assert T.train(_args(run, "--stop-at-step", "3")) is None  # "killed" in stage b, after step 1 of 4
    state = T.load_ckpt(run / "ckpt.pt")
    assert state["step"] == 3 and state["done_stages"] == ["a"]
    before = {k: v.clone() for k, v in state["model"].items()}
    final = T.train(_args(run, "--resume"))
    log = (run / "log.txt").read_text()
    assert "stage b: 4 steps" in log and "from step 1" in log
    state = T.load_ckpt(run / "ckpt.pt")
    assert state["step"] == 6
    assert any(not torch.equal(before[k], state["model"][k]) for k in before)
    import qwen_omni

    assert qwen_omni.load(final).chat([{"role": "user", "content": "hi"}], max_new_tokens=3) is not None


def test_same_command_same_run(tmp_path, monkeypatch):
    """A step-counted run (no --minutes) is a function of its command: stages (v), (a) and (b), augmentation
    included, see the same samples and log the same losses twice, and end at the same weights up to float rounding
    (in one process the second run's kernels may sum in another order; two fresh processes gave bit-identical
    weights, measured); another seed is another run. So "retraining with the documented command" replays it."""
    monkeypatch.setattr(tm, "corpus_texts", lambda *a, **k: _small_corpus())
    extra = ("--steps-v", "2", "--batch-v", "2", "--augment", "0.5", "--train", "no-vision-tower")
    finals = {name: T.train(_args(tmp_path / name, *extra, "--seed", str(seed)))
              for name, seed in (("one", 7), ("two", 7), ("other", 8))}

    def losses(name):
        return re.findall(r"step \d+/\d+ loss [\d.]+", (tmp_path / name / "log.txt").read_text())

    assert losses("one") == losses("two") != losses("other")
    one, two, other = (tm.load_model(finals[n]).state_dict() for n in ("one", "two", "other"))
    # Float-rounding drift over the 8 steps: up to 1.3e-6 measured after the whole suite had run in the process
    # (1.9e-7 without the tests before it); another seed starts from other weights, N(0, 0.02) apart.
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-5) for k in one)
    assert any(not torch.allclose(one[k], other[k], rtol=0, atol=1e-3) for k in one)


def _small_corpus():
    from qwen_omni.synthetic.templates import CHITCHAT

    return [tm.SYSTEM_PROMPT, "What color is the red one? 0123456789 top left beeps"] + [
        a for _, a in CHITCHAT.values()]


def test_finetune_projectors_on_jsonl(tmp_path, ckpt, monkeypatch):
    """Only the projectors change; the fine-tune reads images as its source checkpoint's preprocessor config says
    (not the tiny model's defaults) and the export keeps that config."""
    import shutil

    d = tmp_path / "base"
    shutil.copytree(ckpt[0], d)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    pre.update(min_pixels=128 * 128, max_pixels=128 * 128, size={"shortest_edge": 128 * 128, "longest_edge": 128 * 128})
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    built = []
    real = tm.processor_for
    monkeypatch.setattr(tm, "processor_for", lambda cfg, src=None: built.append(p := real(cfg, src)) or p)
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (96, 64), color).save(data / f"{color}.png")
        lines.append(json.dumps({"image": f"{color}.png", "question": "What colour is it?", "answer": color}))
    sr = 16000
    t = np.arange(sr // 2) / sr
    import wave

    with wave.open(str(data / "tone.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).tobytes())
    lines.append(json.dumps({"audio": "tone.wav", "question": "High or low?", "answer": "low"}))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ft"
    T.train(T.parse_args(["--run", str(tmp_path / "run"), "--init", str(d), "--data", str(data), "--train",
                          "projectors", "--steps", "2", "--batch", "3", "--eval-every", "0", "--no-tqdm",
                          "--out", str(out)]))
    base, tuned = tm.load_model(d).state_dict(), tm.load_model(out).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith(("visual.merger", "audio_tower.proj")) for k in changed), sorted(changed)[:5]
    assert built and {p.p.max_pixels for p in built} == {128 * 128}
    assert json.loads((out / "preprocessor_config.json").read_text()) == pre


# ---------------------------------------------------------------- the shipped model (assets/tiny-omni)

# Fast held-out slice: 10 samples per task (robustness transforms on every other one). Thresholds are the issue's
# targets less a few points; where the shipped model is still short of its target (see its model card), the
# floor is what it measures less a margin, so the test guards against regressions without hiding the gap.
SLICE_FLOORS = {"colour": 90, "shape": 90, "count": 80, "position": 80, "number": 80, "beep_count": 80,
                "pitch": 90, "spoken_word": 80, "video_direction": 80, "video_beeps": 80, "followup": 80,
                "refusal": 90}
# The shipped checkpoint (model card: 90.2% overall on 200/task) meets every target, so no task has a lowered floor;
# a checkpoint short of a target would list it here as {task: its slice result less a margin}, to guard against
# regressions without hiding the gap. Its slice (10/task, seed0 1_000_000): number 80, every other task 100.
SHORT_OF_TARGET: dict[str, int] = {}


@pytest.fixture(scope="module")
def shipped():
    from qwen_omni.assistant import DEFAULT_MODEL

    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("assets/tiny-omni is not built yet")
    import qwen_omni

    return qwen_omni.load(DEFAULT_MODEL)


def test_shipped_model_eval_slice(shipped):
    from qwen_omni.train.evaluate import evaluate, format_table

    res = evaluate(shipped, tuple(SLICE_FLOORS), n=10, seed0=1_000_000, robust=True, progress=False)
    print(format_table(res))
    low = {t: res[t]["acc"] for t in SLICE_FLOORS
           if 100 * res[t]["acc"] < SHORT_OF_TARGET.get(t, SLICE_FLOORS[t]) - 1e-6}
    assert not low, f"below the floor: {low}\n{format_table(res)}"


# One held-out prompt per multimodal task (image, audio, video, video with its sound, a two-turn image chat).
PARITY_TASKS = ("colour", "shape", "count", "position", "number", "beep_count", "pitch", "spoken_word",
                "video_direction", "video_beeps", "followup", "refusal")


def test_shipped_model_matches_transformers(shipped):
    """transformers' own class reads the shipped folder and greedily gives our answers on held-out prompts (the
    inputs are our processor's tensors: transformers' video processor needs torchvision, which we do not install)."""
    from qwen_omni.assistant import DEFAULT_MODEL
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    hf = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    multimodal = 0
    for i, task in enumerate(PARITY_TASKS):
        s = make_sample(task, 2_000_000 + i, "heldout")
        inp = shipped.prepare(s.messages)
        multimodal += any(k in inp for k in ("pixel_values", "pixel_values_videos", "input_features"))
        ours = shipped.tokenizer.encode(shipped.chat(s.messages, max_new_tokens=12))
        with_sound = any(p.get("use_audio_in_video") for m in s.messages if isinstance(m["content"], list)
                         for p in m["content"])
        theirs = _hf_greedy(hf, inp, 12, set(shipped.stop_ids), use_audio_in_video=with_sound)
        assert shipped.tokenizer.decode(theirs, skip_special_tokens=True) == shipped.tokenizer.decode(ours), task
    assert multimodal >= 10


def test_shipped_model_answers_uploaded_files(shipped, tmp_path):
    """Real uploads: a PNG and a JPEG, a WAV and an MP3, an MP4 with sound - decoded by the processor."""
    import av

    from qwen_omni.synthetic import audio as sa
    from qwen_omni.synthetic import media as sm
    from qwen_omni.synthetic.tasks import normalize_answer

    s = make_sample("colour", 3, "heldout")
    img = s.messages[0]["content"][0]["image"]
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "a.jpg", quality=90)
    q = s.messages[0]["content"][1]["text"]
    for f in ("a.png", "a.jpg"):
        reply = shipped.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / f)},
                                                           {"type": "text", "text": q}]}], max_new_tokens=16)
        assert reply.strip(), f
    b = make_sample("pitch", 4, "heldout")
    sr, x = b.messages[0]["content"][0]["audio"]
    import wave

    with wave.open(str(tmp_path / "b.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())
    assert sr == sa.SR
    (tmp_path / "b.mp3").write_bytes(sa.encode_audio(x, "mp3"))  # MP3 like a phone recording
    answers = {}
    for f in ("b.wav", "b.mp3"):
        answers[f] = shipped.chat([{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / f)},
                                                                {"type": "text", "text": "Are the beeps high or low?"}]}],
                                  max_new_tokens=8)
    assert all(normalize_answer(a) in ("high", "low") for a in answers.values()), answers
    v = make_sample("video_direction", 5, "heldout")
    video = v.messages[0]["content"][0]["video"]
    frames = video["frames"]
    with av.open(str(tmp_path / "c.mp4"), "w") as out:
        st = out.add_stream(sm._video_codec(), rate=2)
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for fr in frames:
            out.mux(st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format="rgb24")))
        out.mux(st.encode())
    reply = shipped.chat([{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "c.mp4")},
                                                       {"type": "text", "text": "Which way is the shape moving?"}]}],
                         max_new_tokens=8)
    assert reply.strip()
