"""Forward KL(teacher || student) and argmax agreement with the teacher, per completion token,
before and after 200 steps of plain OPD at lr 5e-4 (beta 0), on the teacher's greedy completions
and on the start student's sampled ones (128 problems of seed 99). Usage, from the repo root:

    renio-train --student experiments/models/student-headroom --objective opd --lr 5e-4 \
        --steps 200 --eval-problems 512 --eval-every 50 --save-every 0 --out /tmp/opd-lr5e-4
    python experiments/selection-2026-11-30/kl_vs_argmax.py /tmp/opd-lr5e-4/final
"""

import sys

import torch

from renio_kernels.train.generation import sample, sequences_for
from renio_kernels.train.models import load_model, load_tokenizer
from renio_kernels.train.tasks import DEFAULT_PROMPT, format_prompt, synthetic_problems

TEACHER, START = "renio_kernels/train/assets/teacher", "experiments/models/student-headroom"
torch.set_num_threads(2)
prompts = [format_prompt(DEFAULT_PROMPT, p) for p in synthetic_problems(99, 128)]
tok = load_tokenizer(TEACHER, "teacher")
t = load_model(TEACHER, "teacher", "sdpa").eval()
s0, s1 = (load_model(p, "student", "sdpa").eval() for p in (START, sys.argv[1]))
torch.manual_seed(0)
with torch.no_grad():
    for source, model in (("teacher greedy", t), ("start student sampled", s0)):
        r = sample(model, tok, prompts, max_new_tokens=64, do_sample=model is s0)
        ids, mask, pos, labels = sequences_for(r.prompt_ids, r.prompt_mask, r)
        c, valid = labels.shape[1], labels != -100
        lt = t(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -c - 1 : -1]
        lt = lt.log_softmax(-1)
        for name, s in (("start", s0), ("after opd", s1)):
            ls = s(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -c - 1 : -1]
            ls = ls.log_softmax(-1)
            kl = (lt.exp() * (lt - ls)).sum(-1)[valid].mean().item()
            agree = (lt.argmax(-1) == ls.argmax(-1))[valid].float().mean().item()
            print(f"{source:22s} {name:9s} forward KL {kl:.4f}  argmax agreement {agree:.4f}")
