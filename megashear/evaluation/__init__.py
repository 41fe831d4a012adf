"""Downstream evaluation of exported (Hugging Face format) models with lm-eval.

``downstream_task`` builds a local lm-eval task, a 4-way multiple-choice continuation test, from
held-out corpus text (documents no training, pruning or preprocessing run reads);
``lm_eval_score`` scores an HF model directory on it, offline; ``greedy_text`` continues its
held-out passages greedily and measures how much the text loops (seq-rep-n). lm-eval (the
``eval`` extra) is imported only when a score is asked for.
"""
