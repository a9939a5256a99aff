"""TRL-format samples for configs/trl-formats.toml, made from the shipped real samples
(../hh-rlhf and ../oasst1): the same texts, rewritten in each of TRL's dataset layouts.

    python3 make_samples.py
"""
import json
from pathlib import Path

here = Path(__file__).parent
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def hh_split(text):
    """HH-RLHF dialogue -> (prompt ending in '\\n\\nAssistant:', reply with its leading space)."""
    cut = text.rfind(ASSISTANT) + len(ASSISTANT)
    return text[:cut], text[cut:]


def hh_messages(prompt):
    msgs, role = [], None
    for part in prompt.replace(ASSISTANT, "\x00assistant\x01").replace(HUMAN, "\x00user\x01").split("\x00"):
        if "\x01" not in part:
            continue
        role, content = part.split("\x01", 1)
        msgs.append({"role": role, "content": content.strip()})
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


hh = [json.loads(l) for l in open(here.parent / "hh-rlhf" / "harmless-base-test-sample.jsonl")][:12]
pairs = []
for r in hh:
    p, c = hh_split(r["chosen"])
    p2, rj = hh_split(r["rejected"])
    if p == p2 and c.strip() and rj.strip() and c != rj:
        pairs.append((p, c, rj))
pairs = pairs[:8]

# OASST: a prompt with two ranked replies (rank 0 preferred).
rows = [json.loads(l) for l in open(here.parent / "oasst1" / "en-validation-messages-sample.jsonl")]
by_parent = {}
for r in rows:
    if r["role"] == "assistant" and r.get("rank") is not None and r.get("review_result"):
        by_parent.setdefault(r["parent_id"], []).append(r)
texts = {r["message_id"]: r for r in rows}
conv = []
for parent, replies in by_parent.items():
    q = texts.get(parent)
    if q is None or q["parent_id"] is not None or len(replies) < 2:
        continue
    replies.sort(key=lambda r: r["rank"])
    conv.append(([{"role": "user", "content": q["text"]}], replies[0]["text"], replies[-1]["text"]))
    if len(conv) == 8:
        break


def write(name, recs):
    with open(here / name, "w") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


write("preference.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs])
write("preference-conversational.jsonl", [
    {"prompt": m, "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}]}
    for m, c, r in conv])
write("unpaired.jsonl", [rec for p, c, r in pairs
                         for rec in ({"prompt": p, "completion": c, "label": True},
                                     {"prompt": p, "completion": r, "label": False})])
write("unpaired-conversational.jsonl", [rec for m, c, r in conv
    for rec in ({"prompt": m, "completion": [{"role": "assistant", "content": c}], "label": True},
                {"prompt": m, "completion": [{"role": "assistant", "content": r}], "label": False})])
write("messages.jsonl", [rec for p, c, r in pairs
    for rec in ({"messages": hh_messages(p) + [{"role": "assistant", "content": c.strip()}], "label": True},
                {"messages": hh_messages(p) + [{"role": "assistant", "content": r.strip()}], "label": False})])
write("own-columns.jsonl", [rec for m, c, r in conv
    for rec in ({"question": m[0]["content"], "answer": c, "good": True},
                {"question": m[0]["content"], "answer": r, "good": False})])
print(len(pairs), "HH pairs,", len(conv), "OASST pairs")
