#!/usr/bin/env python
"""Did the fine-tune help? Base model against base + adapter on the run's held-out records.

    python scripts/eval.py --store URI --run NAME [--checkpoint ID] [--prompts N]
                           [--max-new-tokens N] [--micro-batch-size N] [--json OUT]

Everything comes from the store (spec, data, checkpoint), so it works on any machine: the
held-out split is the one the run held out (the same seeded split, or the run's eval file).
Both models run in the run's own configuration (the 4-bit base as trained, the same template
and loss masking), so the two losses are the completion-token loss the run optimised. Then N
held-out prompts are answered greedily by each, beside the reference, and one verdict line
follows. The result is written into the store at <run>/evals/<checkpoint>.json (beside, not
inside, the checkpoint: the checkpoint's manifest and retention stay as they were) and to
--json OUT when given. It takes no lease: a reader, like `agent.py status`.

Exit codes: 0 evaluated, 1 the store stayed unreachable or an unexpected error, 2 invalid input
(no such run or checkpoint, or a run with no held-out data).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python scripts/eval.py` puts scripts/ on the path, not the root
    sys.path.insert(0, str(ROOT))

from baton.session.codes import FAILED, INVALID, OK  # noqa: E402 - after the path set-up


class EvalInputError(Exception):
    """Invalid input (exit 2); the message says what to fix."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the run's store URI")
    parser.add_argument("--run", required=True, help="the run's name")
    parser.add_argument("--checkpoint", help="a checkpoint id like 00000120-g3 (default: HEAD's)")
    parser.add_argument("--prompts", type=int, default=3, help="held-out prompts to answer")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.prompts < 0 or args.max_new_tokens < 1 or args.micro_batch_size < 1:
        parser.error("--prompts must be >= 0, --max-new-tokens and --micro-batch-size >= 1")
    return args


# -- inputs from the store -----------------------------------------------------------------

def read_spec(runstore):
    spec = runstore.read_spec()
    if spec is None:
        raise EvalInputError(f"no run {runstore.run!r} in store {runstore.store.uri}; check "
                             "--run and --store")
    if not spec.data.eval:
        raise EvalInputError(
            f"run {runstore.run!r} holds no data out (data.eval is {spec.data.eval!r}), so "
            "there is nothing to judge it on; set data.eval in run.yaml to a fraction (e.g. "
            "0.05) or an eval file, and start a new run")
    return spec


def fetch_inputs(runstore, spec, workdir: Path) -> tuple[Path, Optional[Path]]:
    """The run's data files from the store (or its Hub dataset at the run's commit), checked
    against the spec's sha256."""
    from baton.session.spec import local_inputs

    return local_inputs(runstore, spec, None, workdir)


def pull(runstore, checkpoint: Optional[str], dest: Path):
    """(id, folder) of the named checkpoint, or HEAD's (with pull's verified fallback)."""
    from baton.handoff.checkpoint import pull_chosen

    ref = pull_chosen(runstore, checkpoint, dest)
    if ref is None:
        raise EvalInputError(f"run {runstore.run!r} has no checkpoint yet; run a session first")
    return ref.id, ref.path


# -- prompts and answers -------------------------------------------------------------------

def prompt_of(record: dict[str, Any], fmt: str, encoder) -> tuple[str, list[int], str]:
    """(the prompt as a person reads it, its token ids as the model saw them in training,
    the reference answer)."""
    tok = encoder.tok
    if fmt == "chat":
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        text = tok.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return str(messages[last - 1]["content"]), ids, str(messages[last]["content"])
    if fmt == "pairs":
        prompt = str(record["prompt"])
        return prompt, encoder.prompt_ids(prompt), str(record["completion"])
    text = str(record["text"])  # plain text: the model continues its first third
    cut = len(text) // 3
    return text[:cut], encoder.prompt_ids(text[:cut]), text[cut:]


def answer(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    import torch

    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)


def answers(trainer, prompts, max_new_tokens: int) -> list[str]:
    return [answer(trainer.model, trainer.tokenizer, ids, max_new_tokens)
            for _, ids, _ in prompts]


# -- the evaluation ------------------------------------------------------------------------

def judge(trainer, folder: Path, n_prompts: int, max_new_tokens: int) -> dict[str, Any]:
    """Base first (a fresh adapter's B is zero: exactly the base model, 4-bit as trained),
    then the checkpoint's adapter on the same model."""
    data = trainer.data
    records = data.eval_used  # the run's own eval subset (eval.max_records)
    if not records:
        raise EvalInputError("the run's held-out split is empty (too few records for its "
                             "data.eval fraction); set a larger data.eval or an eval file")
    if trainer.classifier:  # accuracy, F1 and the confusion matrix: scripts/eval_classify.py
        from baton.scripts.eval_classify import judge_classifier

        return judge_classifier(trainer, folder)
    tokens = sum(s.label_tokens for s in data.eval_samples())
    prompts = [prompt_of(r, trainer.spec.data.format, data.encoder) for r in records[:n_prompts]]
    base_loss = trainer.evaluate()
    base_answers = answers(trainer, prompts, max_new_tokens)
    trainer.load(folder)
    tuned_loss = trainer.evaluate()
    tuned_answers = answers(trainer, prompts, max_new_tokens)
    samples = [{"prompt": p, "reference": ref, "base": b, "tuned": t}
               for (p, _, ref), b, t in zip(prompts, base_answers, tuned_answers)]
    return {"eval_records": len(records), "base": {"loss": base_loss, "tokens": tokens},
            "tuned": {"loss": tuned_loss, "tokens": tokens}, "samples": samples}


def verdict(result: dict[str, Any]) -> str:
    base, tuned = result["base"]["loss"], result["tuned"]["loss"]
    change = 100.0 * (tuned - base) / base if base else 0.0
    where = (f"on {result['eval_records']} held-out records "
             f"({result['base']['tokens']:,} completion tokens)")
    if tuned < base:
        return (f"verdict: the fine-tune helps {where}: loss {tuned:.4f} vs base {base:.4f} "
                f"({change:+.1f}%)")
    return (f"verdict: the fine-tune does NOT beat its base {where}: loss {tuned:.4f} vs base "
            f"{base:.4f} ({change:+.1f}%); check the training data before using it")


def show(result: dict[str, Any]) -> None:
    if "confusion" in result:
        from baton.scripts.eval_classify import show as show_classification

        return show_classification(result)
    for i, s in enumerate(result["samples"], 1):
        print(f"\n--- held-out prompt {i} ---\n{s['prompt'].strip()}")
        for label in ("reference", "base", "tuned"):
            print(f"--- {label} ---\n{s[label].strip() or '(empty)'}")
    print()
    print(verdict(result))


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    from baton.handoff import open_store
    from baton.handoff.runstore import RunStore
    from baton.training.engine import Trainer

    store = open_store(args.store)
    try:
        runstore = RunStore(store, args.run)
        spec = read_spec(runstore)
        with tempfile.TemporaryDirectory(prefix="baton-eval-") as tmp:
            train, held = fetch_inputs(runstore, spec, Path(tmp))
            cid, folder = pull(runstore, args.checkpoint, Path(tmp) / "checkpoint")
            print(f"judging checkpoint {cid} of run {args.run!r} against its base model",
                  flush=True)
            trainer = Trainer(spec, data_path=train, eval_path=held,
                              micro_batch_size=args.micro_batch_size)
            result = {"checkpoint": cid,
                      **judge(trainer, folder, args.prompts, args.max_new_tokens)}
        body = json.dumps(result, indent=2, ensure_ascii=False).encode()
        key = runstore.key("evals", f"{cid}.json")
        store.write(key, body)  # a report, not run state: unconditional, like a session record
        if "confusion" in result:
            _store_confusion(store, runstore.key("evals", f"{cid}.confusion.png"), result)
        result["stored_at"] = f"{store.uri}/{key}"
    finally:
        store.close()
    return result


def _store_confusion(store, key: str, result: dict[str, Any]) -> None:
    from baton.scripts.eval_classify import plot_confusion

    with tempfile.TemporaryDirectory(prefix="baton-eval-") as tmp:
        store.write(key, plot_confusion(result, Path(tmp) / "confusion.png").read_bytes())


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from baton.handoff.errors import StoreError, StoreUnavailableError
    from baton.handoff.secrets import scrub
    from baton.session.quiet import silence_bnb_kernel_notice
    from baton.training.data import DataError
    from baton.training.engine import CheckpointError
    from baton.training.hub_data import DatasetUnavailableError
    from baton.training.model import ModelLoadError, ModelUnavailableError

    silence_bnb_kernel_notice()
    try:
        result = evaluate_run(args)
    except (StoreUnavailableError, ModelUnavailableError, DatasetUnavailableError) as exc:
        print(scrub(f"error: {exc}; try again"), file=sys.stderr)
        return FAILED
    except (EvalInputError, StoreError, DataError, CheckpointError, ModelLoadError) as exc:
        print(scrub(f"error: {exc}"), file=sys.stderr)
        return INVALID
    show(result)
    print(f"result written to {result['stored_at']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"and to {args.json}")
        if "confusion" in result:
            from baton.scripts.eval_classify import plot_confusion, png_beside

            print(f"confusion matrix drawn in {plot_confusion(result, png_beside(args.json))}")
    return OK


if __name__ == "__main__":
    raise SystemExit(main())
