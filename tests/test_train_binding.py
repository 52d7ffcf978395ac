"""Dense supervision of the decoder: scene dialogues, labels on every assistant turn, attention supervision.

- a scene dialogue asks several distinct questions about one image, and each answer is the attribute of the
  object its turn is about (checked against the renderer's geometry in `Sample.meta`);
- `encode` labels every assistant turn (a follow-up's first answer too) and nothing of the prompts;
- the attention-supervision rows point from the position that predicts an answer to the vision tokens of the
  object it is about (and to nothing else);
- `BindingLoss` equals -log(attention mass on the target) computed from the decoder's own attention, and a few
  steps on it move the supervised heads' attention onto the targets.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qwen_omni.models import decoder as Dec
from qwen_omni.synthetic import tasks as S
from qwen_omni.train import tiny_model as tm
from qwen_omni.train import data as D
from qwen_omni.train.binding import BindingLoss, parse_heads


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from qwen_omni.engine.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("micro-bind")
    tok = tm.train_tokenizer(tm.corpus_texts(n_per_task=4), vocab_size=400)
    model = tm.new_model(tok.get_vocab_size(), "micro", seed=0)
    tm.save_pretrained(model, None, d, tok=tok)
    return model, Tokenizer.from_dir(d), tm.processor_for(model.cfg)


def _turns(s):
    """[(question, answer)] of a sample, the final answer included."""
    msgs = s.messages + [{"role": "assistant", "content": s.answer}]
    text = [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"] for m in msgs]
    return list(zip(text[0::2], text[1::2]))


def test_scene_dialogue_answers_match_the_image():
    seen = set()
    for seed in range(40):
        s = S.make_sample("scene", seed)
        objs, targets = s.meta["objects"], s.meta["targets"]
        turns = _turns(s)
        assert 2 <= len(turns) <= 6 and len(targets) == len(turns) and s.meta["n_objects"] == len(objs)
        assert s.messages[0]["content"][0]["type"] == "image"
        for (q, a), k in zip(turns, targets):
            if k is None:
                assert a == str(len(objs)), (q, a)
            else:
                assert a in (objs[k].shape, objs[k].color, objs[k].position), (q, a, objs[k])
        asked = [(k, a) for (_, a), k in zip(turns, targets)]
        assert len(set(asked)) == len(asked)  # no question is asked twice
        seen.add(len(turns))
    assert len(seen) >= 3  # the number of questions varies
    with pytest.raises(ValueError):
        S.make_sample("nonsense", 0)
    assert "scene" not in S.TASKS  # training only: the eval never asks it


def test_encode_labels_every_assistant_turn(micro):
    model, tok, proc = micro
    s = S.make_sample("followup", 3)
    inp = D.encode(proc, tok, s.messages, s.answer, s.meta)
    ids, lab = inp["input_ids"][0], inp["labels"][0]
    spans, cur = [], []
    for i, l in zip(ids.tolist(), lab.tolist()):
        if l != D.IGNORE:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    spans += [tok.decode(cur)] if cur else []
    assert spans == [f"{a}<|im_end|>" for _, a in _turns(s)]


def test_binding_rows_point_at_the_named_object(micro):
    model, tok, proc = micro
    from qwen_omni.train.vision import object_mask, token_labels

    for task, seed in (("colour", 2), ("position", 5), ("scene", 1), ("followup", 3)):
        s = S.make_sample(task, seed)
        inp = D.encode(proc, tok, s.messages, s.answer, s.meta)
        ids, lab = inp["input_ids"][0], inp["labels"][0]
        q, t = inp["bind_q"], inp["bind_t"]
        assert len(q) >= 1 and t.shape == (len(q), len(ids))
        firsts = [i for i in range(1, len(lab)) if lab[i] != D.IGNORE and lab[i - 1] == D.IGNORE]
        assert set((q + 1).tolist()) <= set(firsts)  # the query predicts an answer's first token
        vis = (ids == tm.TOKEN_IDS["<|image_pad|>"]).nonzero().flatten()
        g = inp["image_grid_thw"][0]
        objs = s.meta["objects"]
        who = token_labels(object_mask(objs, s.meta["size"]), {"shape": list(range(len(objs) + 1))}, [],
                           s.meta["size"], (int(g[1]) // 2, int(g[2]) // 2), 32)["shape"]
        for row, qpos in zip(t, q.tolist()):
            k = s.meta["targets"][firsts.index(qpos + 1)]
            assert row.any() and set(row.nonzero().flatten().tolist()) == set(vis[who == k + 1].tolist())
    assert "bind_q" not in D.encode(proc, tok, *(lambda x: (x.messages, x.answer, x.meta))(S.make_sample("count", 1)))


def _batch(micro):
    model, tok, proc = micro
    items = [D.encode(proc, tok, s.messages, s.answer, s.meta)
             for s in (S.make_sample(t, i) for i, t in enumerate(("scene", "colour", "chitchat", "followup")))]
    return D.collate(items)


def test_binding_loss_is_the_attention_mass(micro, monkeypatch):
    model, _, _ = micro
    batch = _batch(micro)
    assert batch["bind_rows"].tolist() and set(batch["bind_rows"].tolist()) <= {0, 1, 3}
    probs = []
    sdpa = F.scaled_dot_product_attention

    def explicit(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        s = (q @ kk.transpose(-1, -2)) / q.shape[-1] ** 0.5
        n = q.shape[2]
        probs.append(s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)

    monkeypatch.setattr(Dec, "F", type("F", (), {"scaled_dot_product_attention": staticmethod(explicit),
                                                 "rms_norm": staticmethod(F.rms_norm)}))
    heads = parse_heads("0:1;-1:0,3", 2)
    assert heads == {0: [1], 1: [0, 3]}
    binder = BindingLoss(model, heads)
    model.train()
    model(batch)
    got = binder.loss(batch)
    ref = []
    for layer, hs in heads.items():
        for h in hs:
            ref.append(-torch.log((probs[layer][batch["bind_rows"], h, batch["bind_q"]] * batch["bind_t"]).sum(-1)
                                  + 1e-6))
    torch.testing.assert_close(got, torch.cat(ref).mean(), atol=1e-5, rtol=1e-5)
    binder.remove()


def test_binding_loss_moves_attention_onto_the_target(micro):
    model = copy.deepcopy(micro[0])
    batch = _batch(micro)
    binder = BindingLoss(model, parse_heads("-1:0,1", 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(15):
        model(batch)
        loss = binder.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    model(batch)  # an eval forward keeps nothing
    assert float(binder.loss(batch)) == 0.0
    binder.remove()
