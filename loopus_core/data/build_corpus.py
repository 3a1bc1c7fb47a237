# ruff: noqa: E501  (long string literals of corpus text)
"""Rebuild ``probe_corpus.jsonl``, the built-in probe corpus of ``loopus analyze`` (see PROVENANCE.md).

Run from the repository root with the Python the corpus should be drawn from (CPython 3.11 was used):

    python3 loopus_core/data/build_corpus.py

Deterministic: the same interpreter gives the same file. Each line is ``{"text": ..., "source": ...}``.
Sources: the Python language reference topics shipped with CPython (``pydoc_data.topics``, PSF-2.0),
CPython standard-library source code and module docstrings (PSF-2.0), generated arithmetic and text written
for this project (prose and dialogue, Apache-2.0 like the project).
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).with_name("probe_corpus.jsonl")

# Standard-library modules whose source code and docstrings are used (pure-Python, stable, varied).
STDLIB_MODULES = (
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "colorsys",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "inspect",
    "ipaddress",
    "json.decoder",
    "json.encoder",
    "locale",
    "logging",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "pathlib",
    "pprint",
    "queue",
    "quopri",
    "random",
    "re._parser",
    "sched",
    "secrets",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "struct",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "urllib.parse",
    "uuid",
    "wave",
    "weakref",
    "zipfile",
)


def reference_topics() -> list[dict]:
    """The language-reference topics of ``pydoc_data`` cut into documents of about 1,500 characters."""
    import pydoc_data.topics as topics

    docs = []
    for name in sorted(topics.topics):
        paragraphs = [p.strip() for p in topics.topics[name].split("\n\n") if p.strip()]
        chunk: list[str] = []
        size = 0
        for para in paragraphs:
            chunk.append(para)
            size += len(para)
            if size >= 1500:
                docs.append({"text": "\n\n".join(chunk), "source": f"python-reference:{name}"})
                chunk, size = [], 0
        if size >= 300:
            docs.append({"text": "\n\n".join(chunk), "source": f"python-reference:{name}"})
    return docs


def stdlib_code_and_docstrings() -> list[dict]:
    """Up to four 60-line chunks of source per module, and each module's docstring when long enough."""
    docs = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        lines = inspect.getsource(module).splitlines()
        for start in range(0, min(len(lines), 4 * 60), 60):
            text = "\n".join(lines[start : start + 60]).strip()
            if len(text) > 400:
                docs.append({"text": text, "source": f"cpython-stdlib-code:{name}:{start + 1}"})
        doc = inspect.getdoc(module) or ""
        if len(doc) > 300:
            docs.append({"text": doc[:3000], "source": f"cpython-stdlib-docstring:{name}"})
    return docs


def arithmetic(rng: random.Random, count: int = 200) -> list[dict]:
    """Generated worked arithmetic in several formats (sums, differences, products, word problems)."""
    names = ["Ada", "Bram", "Chen", "Dalia", "Emeka", "Femi", "Greta", "Hana", "Ivo", "Jun", "Kasia", "Luis"]
    things = ["apples", "books", "coins", "stamps", "marbles", "pencils", "tickets", "shells", "cards"]
    docs = []
    for i in range(count):
        lines = []
        for _ in range(rng.randint(6, 14)):
            a, b = rng.randint(2, 999), rng.randint(2, 99)
            kind = rng.randrange(6)
            if kind == 0:
                lines.append(f"{a} + {b} = {a + b}")
            elif kind == 1:
                lines.append(f"Q: What is {a} minus {b}? A: {a - b}.")
            elif kind == 2:
                lines.append(f"{a} * {b} = {a * b}")
            elif kind == 3:
                lines.append(f"{a * b} / {b} = {a}")
            elif kind == 4:
                who, what = rng.choice(names), rng.choice(things)
                lines.append(f"{who} has {a} {what} and gets {b} more, so {who} now has {a + b} {what}.")
            else:
                c = rng.randint(2, 9)
                lines.append(f"({a} + {b}) * {c} = {a + b} * {c} = {(a + b) * c}")
        docs.append({"text": "\n".join(lines), "source": f"generated-arithmetic:{i}"})
    return docs


PROSE = [
    "The ferry left the harbour an hour late. Nobody on board seemed to mind: the sea was flat and grey, "
    "the gulls followed the wake, and an old man near the railing was teaching a boy how to tie a bowline. "
    "By the time the island came into view, the boy could tie it with his eyes closed.",
    "In the spring the river rose over the lower fields, as it did every year. The farmers had learned long "
    "ago not to plant there before May. They kept sheep on the high pasture instead, and waited for the water "
    "to leave behind the dark silt that made the summer crops so good.",
    "She opened the letter at the kitchen table. It was short, written in a careful hand, and it said only "
    "that the house by the lake had been sold, that the new owners would arrive in June, and that the key "
    "should be left under the blue flower pot by the door.",
    "The library closed at nine, but the lights on the second floor stayed on until midnight. The caretaker "
    "said it was the heating system; the students said it was the ghost of a professor who had never finished "
    "his dictionary. Both explanations were, in their way, correct.",
    "A good bread needs four things: flour, water, salt and time. The yeast does most of the work while you "
    "sleep. In the morning the dough is soft and full of air, and it only needs a hot oven and a little "
    "patience before the crust turns brown and crackles as it cools.",
    "The old railway line had been turned into a path for walkers and cyclists. Where the trains once ran, "
    "there were now benches, apple trees and a small cafe in the former station, where the timetable still "
    "hung on the wall, forty years out of date.",
    "Winter came early that year. The first snow fell in October, and by November the road over the pass "
    "was closed. The village filled its cellars with potatoes and firewood, and the children learned to ski "
    "on the slope behind the church before they could properly walk.",
    "He had repaired clocks for fifty years and still could not explain why he loved it. Perhaps it was the "
    "order of it: every wheel had a reason, every spring a task. When a clock stopped, something specific "
    "was wrong, and if you were patient you would find it.",
    "The market opened before dawn. Fishermen laid out the night's catch on beds of ice, bakers stacked warm "
    "loaves in wicker baskets, and an old woman sold bunches of herbs from a wooden cart, calling out their "
    "names in a voice that carried across the whole square.",
    "Every map is a set of decisions about what to leave out. A map of the underground shows the order of the "
    "stations and forgets the distances; a map of the hills shows the height of the land and forgets the "
    "roads. The art is in choosing what the traveller needs to know.",
    "The storm reached the coast just after midnight. Shutters banged, a fence gave way, and the power went "
    "out across the whole town. In the morning the beach was covered with seaweed and broken branches, and "
    "the sky was so clear that the far islands seemed close enough to touch.",
    "Learning a language as an adult is humbling. You know exactly what you want to say, and you can only say "
    "a small part of it, slowly, with mistakes. But one day you notice that you understood a joke, and the "
    "whole effort suddenly feels worth it.",
    "The garden had been neglected for years. Brambles covered the paths, ivy had pulled down half of the "
    "wall, and the pond was green with algae. Yet in the corner an old pear tree still flowered every April, "
    "as if nobody had told it that the house was empty.",
    "Astronomers measure the distance to nearby stars by watching them shift against the background as the "
    "Earth moves around the Sun. The closer the star, the larger the shift. The angle is tiny, far smaller "
    "than the width of a hair held at arm's length, but it can be measured.",
    "A bridge is a conversation between two banks of a river. Engineers listen to the ground on both sides, "
    "to the wind, to the weight of the traffic it will carry and to the water that will flow beneath it for "
    "a hundred years, and then they answer in steel and stone.",
    "The orchestra tuned up in a cloud of sound, each instrument finding the same note in its own way. Then "
    "the conductor raised her hands, the hall went quiet, and for a moment nobody breathed. The first chord "
    "filled the room like light filling a window.",
]

DIALOGUE = [
    (
        "Customer",
        "Hello, I would like to return this jacket. It is too small.",
        "Assistant",
        "Of course. Do you have the receipt with you?",
        "Customer",
        "Yes, here it is. Could I exchange it for a larger size instead?",
        "Assistant",
        "Certainly. We have it in medium and large. Would you like to try them on?",
    ),
    (
        "User",
        "How do I reverse a list in Python?",
        "Assistant",
        "You can call my_list.reverse() to reverse it in place, or use my_list[::-1] for a copy.",
        "User",
        "Which one is faster?",
        "Assistant",
        "Both are fast; reverse() avoids making a copy, so it uses less memory.",
    ),
    (
        "Ana",
        "Are you coming to the concert on Friday?",
        "Ben",
        "I want to, but I have to work until seven.",
        "Ana",
        "It starts at eight, so you have time.",
        "Ben",
        "Then I will meet you at the entrance at a quarter to eight.",
    ),
    (
        "Patient",
        "I have had a headache for three days.",
        "Doctor",
        "Have you had any fever or trouble sleeping?",
        "Patient",
        "No fever, but I have been sleeping badly.",
        "Doctor",
        "Let us check your blood pressure first, and then we can talk about your sleep.",
    ),
    (
        "User",
        "Can you explain what a prime number is?",
        "Assistant",
        "A prime number is a whole number greater than one that has no divisors except one and itself.",
        "User",
        "So is nine a prime number?",
        "Assistant",
        "No. Nine can be divided by three, so it is not prime. Seven and eleven are prime.",
    ),
    (
        "Guide",
        "On your left you can see the old city wall, built in the fourteenth century.",
        "Tourist",
        "Is it possible to walk on top of it?",
        "Guide",
        "Yes, there is a path along the top from the north gate to the river.",
        "Tourist",
        "How long does that take?",
        "Guide",
        "About forty minutes at a comfortable pace.",
    ),
    (
        "Student",
        "I do not understand why the sky is blue.",
        "Teacher",
        "Sunlight contains all colours. Air scatters blue light much more than red light.",
        "Student",
        "Then why are sunsets red?",
        "Teacher",
        "At sunset the light travels through more air, so most of the blue is scattered away.",
    ),
    (
        "User",
        "Write a haiku about autumn.",
        "Assistant",
        "Red leaves on the path / the wind counts them one by one / and keeps none of them.",
        "User",
        "Now one about winter.",
        "Assistant",
        "Snow on the bare field / a single crow writes its name / and then flies away.",
    ),
    (
        "Caller",
        "Hi, I am calling about the flat you advertised.",
        "Landlord",
        "Yes, it is still available. It has two bedrooms and a small balcony.",
        "Caller",
        "Is the rent including heating?",
        "Landlord",
        "Heating and water are included; electricity is separate.",
    ),
    (
        "User",
        "My program prints an error: list index out of range. What does it mean?",
        "Assistant",
        "It means you asked for an element at a position the list does not have.",
        "User",
        "The list has five elements and I ask for element five.",
        "Assistant",
        "Indexing starts at zero, so the last element of a five-element list is at index four.",
    ),
]


def written_text(rng: random.Random) -> list[dict]:
    """The prose passages and dialogues above, each also recombined so that documents vary."""
    docs = [{"text": p, "source": f"written-prose:{i}"} for i, p in enumerate(PROSE)]
    for i, turns in enumerate(DIALOGUE):
        lines = [f"{turns[j]}: {turns[j + 1]}" for j in range(0, len(turns), 2)]
        docs.append({"text": "\n".join(lines), "source": f"written-dialogue:{i}"})
    for i in range(60):  # recombinations: three passages or two dialogues in one document
        if i % 2:
            parts = rng.sample(PROSE, 3)
            docs.append({"text": "\n\n".join(parts), "source": f"written-prose-mix:{i}"})
        else:
            picks = rng.sample(DIALOGUE, 2)
            text = "\n\n".join("\n".join(f"{t[j]}: {t[j + 1]}" for j in range(0, len(t), 2)) for t in picks)
            docs.append({"text": text, "source": f"written-dialogue-mix:{i}"})
    return docs


def main() -> None:
    rng = random.Random(20260515)
    docs = reference_topics() + stdlib_code_and_docstrings() + arithmetic(rng) + written_text(rng)
    with OUT.open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    print(f"wrote {len(docs)} documents, {OUT.stat().st_size} bytes, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
