#!/usr/bin/env python3
"""Validate the retrieval-benchmark corpora in this directory.

Run from anywhere:  python3 knowledge/benches/corpora/check.py
Exits non-zero and prints every problem found.
"""
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LANGS = {
    # lang: (doc size unit, min, max, answer unit, min, max)
    "en": ("words", 250, 600, "words", 3, 12),
    "zh": ("chars", 300, 800, "chars", 4, 15),
}
FIELDS = {"id", "question", "document", "answer_contains"}
QUESTIONS_PER_DOC = 3

errors = []


def err(msg):
    errors.append(msg)


def size(text, unit):
    if unit == "words":
        return len(re.findall(r"[A-Za-z0-9][A-Za-z0-9'’,.-]*", text))
    # Chinese: count Han characters (plus 〇) only: no punctuation, markup or ASCII.
    return len(re.findall(r"[\u3007\u4e00-\u9fff]", text))


def readme_counts():
    """Parse the '| en | 40 | 120 |' style table in README.md."""
    counts = {}
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for m in re.finditer(r"^\|\s*`?(en|zh)`?\s*\|[^|\n]*\|\s*(\d+)\s*\|\s*(\d+)\s*\|", text, re.M):
        counts[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return counts


def check_doc(lang, path, text, unit, lo, hi):
    lines = text.splitlines()
    if not lines or not re.match(r"^# \S", lines[0]):
        err(f"{lang}/{path.name}: first line must be a '# Title'")
    if sum(1 for l in lines if l.startswith("# ")) != 1:
        err(f"{lang}/{path.name}: exactly one '# ' title expected")
    sections = sum(1 for l in lines if l.startswith("## "))
    if not 2 <= sections <= 4:
        err(f"{lang}/{path.name}: {sections} '## ' sections (want 2-4)")
    n = size(text, unit)
    if not lo <= n <= hi:
        err(f"{lang}/{path.name}: {n} {unit} (want {lo}-{hi})")


def main():
    expected = readme_counts()
    all_ids = set()
    for lang, (dunit, dlo, dhi, aunit, alo, ahi) in LANGS.items():
        docdir = ROOT / lang / "docs"
        docs = {p.name: p.read_text(encoding="utf-8") for p in sorted(docdir.glob("*.md"))}
        for name, text in docs.items():
            check_doc(lang, docdir / name, text, dunit, dlo, dhi)

        qpath = ROOT / lang / "questions.jsonl"
        questions = []
        for lineno, line in enumerate(qpath.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                err(f"{qpath.name}:{lineno}: blank line")
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                err(f"{lang}/questions.jsonl:{lineno}: bad JSON: {e}")
                continue
            if set(q) != FIELDS:
                err(f"{lang}/questions.jsonl:{lineno}: fields {sorted(q)} != {sorted(FIELDS)}")
                continue
            questions.append(q)

        per_doc = Counter()
        for q in questions:
            qid, doc, ans = q["id"], q["document"], q["answer_contains"]
            if not re.fullmatch(rf"{lang}-\d{{3}}", qid):
                err(f"{qid}: id should look like {lang}-001")
            if qid in all_ids:
                err(f"{qid}: duplicate id")
            all_ids.add(qid)
            if not q["question"].strip():
                err(f"{qid}: empty question")
            if doc not in docs:
                err(f"{qid}: document {doc!r} does not exist in {lang}/docs")
                continue
            per_doc[doc] += 1
            n = size(ans, aunit)
            if not alo <= n <= ahi:
                err(f"{qid}: answer_contains is {n} {aunit} (want {alo}-{ahi}): {ans!r}")
            occurrences = docs[doc].count(ans)
            if occurrences == 0:
                err(f"{qid}: answer_contains not found in {doc}: {ans!r}")
            elif occurrences > 1:
                err(f"{qid}: answer_contains occurs {occurrences}x in {doc}: {ans!r}")
            if "\n" in ans:
                err(f"{qid}: answer_contains spans a line break")
            others = [name for name, text in docs.items() if name != doc and ans in text]
            if others:
                err(f"{qid}: answer_contains also occurs in {others}: {ans!r}")

        for name in docs:
            if per_doc[name] != QUESTIONS_PER_DOC:
                err(f"{lang}/{name}: {per_doc[name]} questions (want {QUESTIONS_PER_DOC})")

        exp = expected.get(lang)
        if exp is None:
            err(f"README.md: no count row for {lang}")
        elif exp != (len(docs), len(questions)):
            err(f"README.md says {lang} has {exp[0]} docs / {exp[1]} questions, "
                f"found {len(docs)} / {len(questions)}")
        print(f"{lang}: {len(docs)} documents, {len(questions)} questions")

    if errors:
        print(f"\n{len(errors)} problem(s):")
        for e in errors:
            print("  -", e)
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
