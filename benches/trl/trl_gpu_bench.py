#!/usr/bin/env python3
"""TRL KTOTrainer + PEFT on a CUDA GPU: the incumbent for scripts/gpu-check.sh (kto-train's own
repository script; trl_kto_bench.py and trl_real_bench.py beside it are the CPU versions, copied
unchanged from the workplace's bench folder).

Same work as kto-train's units: LoRA r 16 / alpha 32 on all seven projections (TRL's
disable_dropout zeroes PEFT's dropout), beta 0.1, lr 2e-4 constant, gradient checkpointing (TRL's
default), weights in bf16 and KTOConfig(bf16=True) (autocast; PEFT keeps the LoRA weights in
fp32), no reference precompute.

  trl_gpu_bench.py make-model OUT --shape 135m|360m [--tokenizer DIR]
      a random-weight SmolLM2-shaped Hugging Face folder (bf16 safetensors); with --tokenizer
      the folder's tokenizer files are copied (the real SmolLM2 tokenizer), without it
      make_random_smollm2.py's one-word-one-token tokenizer is used (360m only: exact lengths)
  trl_gpu_bench.py synthetic MODEL --batch B --prompt-len P --completion-len C [--steps 3 --warmup 1]
      s/step (median of the measured steps)
  trl_gpu_bench.py real MODEL DATA.jsonl [--batch 2]
      one epoch over {prompt, completion, label} records (max_length 512): examples/s over the
      steps after the first
  --device cpu before the command: a dry run where there is no GPU

Prints one JSON line with the figure and torch's peak allocated/reserved GPU memory.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="trl_gpu_ds_")

DEVICE = "cuda"
HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    # SmolLM2-135M (config.json of HuggingFaceTB/SmolLM2-135M-Instruct) and SmolLM2-360M.
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
}


def make_model(out, shape, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        if shape != "360m":
            sys.exit("make-model: without --tokenizer only the 360m shape (make_random_smollm2.py)")
        import subprocess
        subprocess.run([sys.executable, os.path.join(HERE, "make_random_smollm2.py"), out], check=True)
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      head_dim=64, **SHAPES[shape])
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        src = os.path.join(tokenizer, f)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(out, f))
    if not os.path.exists(os.path.join(out, "tokenizer_config.json")):
        # SmolLM2-Instruct's special tokens (its tokenizer_config.json), for a bare tokenizer.json.
        json.dump(dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                       unk_token="<|endoftext|>", tokenizer_class="PreTrainedTokenizerFast",
                       model_max_length=8192), open(os.path.join(out, "tokenizer_config.json"), "w"))


def sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def trainer(model_dir, ds, batch, max_length, steps_cb):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(DEVICE)

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, *a, **k):
            sync()
            steps_cb(time.perf_counter() - self.t0)

    cfg = KTOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=1, max_length=max_length, num_train_epochs=1,
                    learning_rate=2e-4, lr_scheduler_type="constant", bf16=True, gradient_checkpointing=True,
                    logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                    dataloader_num_workers=0, seed=42, use_cpu=(DEVICE == "cpu"))
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return KTOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft,
                      callbacks=[Timer()]), tok


def memory():
    import torch
    if DEVICE != "cuda":
        import resource
        return dict(peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
    return dict(peak_allocated_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 3))


def synthetic(a):
    sys.path.insert(0, HERE)
    from transformers import AutoTokenizer
    from trl_kto_bench import make_dataset

    tok = AutoTokenizer.from_pretrained(a.model)
    n = a.batch * (a.steps + a.warmup)
    ds = make_dataset(tok, n, a.prompt_len, a.completion_len, seed=0)
    times = []
    tr, _ = trainer(a.model, ds, a.batch, a.prompt_len + a.completion_len, times.append)
    tr.train()
    measured = sorted(times[a.warmup:]) or times
    med = measured[len(measured) // 2]
    print(json.dumps(dict(unit="synthetic", system="trl", batch=a.batch, prompt=a.prompt_len,
                          completion=a.completion_len, steps=len(measured), s_per_step=round(med, 4),
                          **memory())), flush=True)


def real(a):
    from datasets import Dataset

    rows = [json.loads(l) for l in open(a.data)]
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "completion", "label")})
    times = []
    tr, _ = trainer(a.model, ds, a.batch, 512, times.append)
    tr.train()
    after_first = times[1:]
    eps = a.batch * len(after_first) / sum(after_first)
    print(json.dumps(dict(unit="real", system="trl", batch=a.batch, steps=len(times),
                          examples_per_s=round(eps, 3), **memory())), flush=True)


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a dry run of the script where no GPU is")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("out")
    m.add_argument("--shape", choices=sorted(SHAPES), required=True)
    m.add_argument("--tokenizer")
    s = sub.add_parser("synthetic")
    s.add_argument("model")
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--prompt-len", type=int, default=256)
    s.add_argument("--completion-len", type=int, default=256)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--warmup", type=int, default=1)
    r = sub.add_parser("real")
    r.add_argument("model")
    r.add_argument("data")
    r.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    DEVICE = a.device
    if a.cmd == "make-model":
        make_model(a.out, a.shape, a.tokenizer)
    elif a.cmd == "synthetic":
        synthetic(a)
    else:
        real(a)


if __name__ == "__main__":
    main()
