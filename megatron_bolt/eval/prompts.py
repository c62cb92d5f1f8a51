"""Evaluation prompts as token ids and as text, built from the same segments so the two always agree.

Formats (bolt-method.md, "Evaluation"); ``SOL``/``PRIOR``/``EOL`` are the latent tokens, placed by id::

    MATH   demo:   Problem:\\n{problem}\\n SOL PRIOR {latent} EOL Final Answer: {answer}\\n\\n
           query:  Problem:\\n{problem}\\n SOL PRIOR
    GSM8K  demo:   Question: {problem}\\n\\nFinal Answer: SOL PRIOR {latent} EOL Final Answer: {answer}\\n\\n
           query:  Question: {problem}\\n\\nFinal Answer: SOL PRIOR
    embedded:      {question} SOL PRIOR            (zero-shot; the question text ends with a blank line)

Every prompt starts with BOS. A raw model (``eval.latent=false``) gets the same text without the latent
parts: MATH demos read ``Problem:\\n{problem}\\nFinal Answer: {answer}``, GSM8K demos ``... Final Answer:
{answer}``, and the four latent tokens are banned from its output. Generation stops at the next problem's
header (``Problem:``, ``Question:``, ``Q:``), at SOL (a new latent starts a new chunk) or at EOS. A latent
model's answer is what follows its first EOL; one that never closes its latent has given no answer.

Text segments are encoded with ``BoltTokenizer.encode``, which never yields a special id, so a problem that
contains the string ``<|END_OF_LATENT|>`` stays text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_bolt.data.tokenizer import BoltTokenizer
from megatron_bolt.eval import demos
from megatron_bolt.eval.tasks import EvalDataError, read_records
from megatron_bolt.sample.interfaces import SamplingParams

Segment = str | int  # text, or a special token placed by id

LATENT_ANSWER = "Final Answer: {answer}"
DEMO_SEPARATOR = "\n\n"
DEFAULT_SHOTS = {"math": 4, "gsm8k": 8, "embedded": 0}


@dataclass(frozen=True)
class TaskFormat:
    header: str  # the problem as the prompt states it ({problem})
    raw_answer: str  # what follows the header in a raw model's demonstration ({answer})
    stop_string: str  # the next problem's header: the model has finished this one


FORMATS = {
    "math": TaskFormat("Problem:\n{problem}\n", "Final Answer: {answer}", "Problem:"),
    "gsm8k": TaskFormat("Question: {problem}\n\nFinal Answer:", " {answer}", "Question:"),
    "embedded": TaskFormat("{problem}", "{answer}", "Q:"),
}


@dataclass(frozen=True)
class Demo:
    problem: str
    latent: str
    answer: str


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Completion:
    """A generation split into the latent the model wrote (None for raw models) and its answer text."""

    latent: str | None
    answer: str | None  # None: a latent model that never wrote EOL


def prompt_segments(task: str, problem: str, demos: list[Demo], latent: bool, tokenizer: BoltTokenizer
                    ) -> list[Segment]:
    fmt, ids = FORMATS[task], tokenizer.ids
    segments: list[Segment] = [ids.bos]
    for demo in demos:
        segments.append(fmt.header.format(problem=demo.problem))
        if latent:
            segments += [ids.sol, ids.prior, demo.latent, ids.eol, LATENT_ANSWER.format(answer=demo.answer)]
        else:
            segments.append(fmt.raw_answer.format(answer=demo.answer))
        segments.append(DEMO_SEPARATOR)
    segments.append(fmt.header.format(problem=problem))
    if latent:
        segments += [ids.sol, ids.prior]
    return segments


def _runs(segments: list[Segment]) -> list[Segment]:
    """Adjacent text segments joined, so text is tokenised as one piece between special tokens."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, str) and out and isinstance(out[-1], str):
            out[-1] += seg
        else:
            out.append(seg)
    return out


def build_prompt(task: str, problem: str, demos: list[Demo], latent: bool, tokenizer: BoltTokenizer) -> Prompt:
    ids: list[int] = []
    text = []
    for seg in _runs(prompt_segments(task, problem, demos, latent, tokenizer)):
        if isinstance(seg, str):
            ids += tokenizer.encode(seg)
            text.append(seg)
        else:
            ids.append(seg)
            text.append(tokenizer.decode([seg]))
    return Prompt(ids, "".join(text))


def sampling_params(task: str, tokenizer: BoltTokenizer, latent: bool, max_tokens: int) -> SamplingParams:
    """Greedy decoding with the task's stops; raw models may not emit latent tokens."""
    ids = tokenizer.ids
    banned = () if latent else (ids.sol, ids.eol, ids.prior, ids.posterior)
    return SamplingParams(n=1, max_tokens=max_tokens, temperature=0.0, stop_token_ids=(ids.sol, ids.eos),
                          stop_strings=(FORMATS[task].stop_string,), banned_token_ids=banned)


def read_completion(task: str, token_ids: list[int], tokenizer: BoltTokenizer, latent: bool) -> Completion:
    """The latent and the answer text, without the stop token and without the stop string onwards."""
    ids = tokenizer.ids
    rest = list(token_ids)
    if rest and rest[-1] in (ids.sol, ids.eos):
        rest.pop()
    thought = None
    if latent:
        if ids.eol not in rest:
            return Completion(tokenizer.decode(rest), None)
        end = rest.index(ids.eol)
        thought, rest = tokenizer.decode(rest[:end]), rest[end + 1:]
    answer = tokenizer.decode(rest)
    stop = answer.find(FORMATS[task].stop_string)
    return Completion(thought, answer if stop < 0 else answer[:stop])


def load_demos(task: str, fewshot_path: str | None, num_shots: int | None) -> list[Demo]:
    """The first ``num_shots`` (default: the task's) demonstrations, bundled or from ``fewshot_path``."""
    shots = DEFAULT_SHOTS[task] if num_shots is None else num_shots
    if shots == 0:
        return []
    if fewshot_path:
        records, source = read_records(Path(fewshot_path)), fewshot_path
    else:
        records, source = list({"math": demos.MATH, "gsm8k": demos.GSM8K}[task]), f"the bundled {task} demos"
    if len(records) < shots:
        raise EvalDataError(f"eval.num_shots={shots} but {source} holds only {len(records)} demonstrations")
    out = []
    for i, rec in enumerate(records[:shots]):
        missing = [k for k in ("problem", "latent", "answer") if not isinstance(rec.get(k), str)]
        if missing:
            raise EvalDataError(f"{source}: demonstration {i} lacks string field(s) {missing}; each needs "
                                f"'problem', 'latent' and 'answer' (found keys {sorted(rec)})")
        out.append(Demo(rec["problem"], rec["latent"], rec["answer"]))
    return out
