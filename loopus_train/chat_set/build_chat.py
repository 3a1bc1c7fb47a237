# ruff: noqa: E501  (long string literals of conversation text)
"""Rebuild ``chat_set.jsonl``, the built-in chat set of ``loopus finetune --data builtin:chat`` (see
PROVENANCE.md).

    python3 loopus_train/chat_set/build_chat.py

Deterministic (a seeded generator; no network, no model). Each line is ``{"messages": [...], "source": ...}``
with role/content turns. Every conversation is written for this project: hand-written question/answer
pairs, and instructions filled from templates whose answers are computed here (arithmetic, unit
conversions, calendar dates, word and list manipulations), so that every answer is correct.
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("chat_set.jsonl")
SYSTEM = "You are a concise, accurate assistant. Answer clearly and show your working when it helps."

# Hand-written explanations: (question, answer).
EXPLAIN = [
    (
        "What is photosynthesis?",
        "Photosynthesis is the process by which plants, algae and some bacteria turn light into chemical energy. Using sunlight, they combine carbon dioxide and water into glucose and release oxygen as a by-product.",
    ),
    (
        "Why is the sky blue?",
        "Sunlight is scattered by the molecules of the air, and shorter wavelengths are scattered much more strongly than longer ones (Rayleigh scattering). Blue light is therefore spread across the whole sky, while the sun itself looks slightly yellow.",
    ),
    (
        "What does a compiler do?",
        "A compiler translates a program written in a high-level language into a lower-level form, usually machine code or bytecode, that a computer can run. It also checks the program for errors such as wrong types or undefined names.",
    ),
    (
        "Explain recursion in one paragraph.",
        "Recursion is when a function solves a problem by calling itself on a smaller version of the same problem. Each call works on a simpler input until a base case is reached that can be answered directly; the results are then combined on the way back up.",
    ),
    (
        "What is the difference between weather and climate?",
        "Weather is the state of the atmosphere at a given place and time: today's rain or tomorrow's sunshine. Climate is the average pattern of weather in a region over many years, such as a hot dry summer and a mild wet winter.",
    ),
    (
        "How does a vaccine work?",
        "A vaccine shows the immune system a harmless version or part of a pathogen. The body learns to recognise it and builds memory cells, so that a later real infection is fought off quickly, before it can cause serious illness.",
    ),
    (
        "What is a prime number?",
        "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. The first primes are 2, 3, 5, 7, 11 and 13; 2 is the only even one.",
    ),
    (
        "What is inflation?",
        "Inflation is the general rise of prices over time, which means that the same amount of money buys less than before. It is usually measured as the yearly percentage change of a consumer price index.",
    ),
    (
        "Why do we have seasons?",
        "The Earth's axis is tilted by about 23.5 degrees relative to its orbit. As the Earth goes around the sun, each hemisphere is tilted towards the sun for part of the year, with longer days and more direct sunlight (summer), and away from it for the other part (winter).",
    ),
    (
        "What is an API?",
        "An API (application programming interface) is a defined set of functions, messages or endpoints through which one piece of software can use another, without knowing how it is implemented inside.",
    ),
    (
        "What is the water cycle?",
        "The water cycle is the continuous movement of water on Earth: it evaporates from oceans and lakes, condenses into clouds, falls as rain or snow, and flows back through rivers and ground water into the sea.",
    ),
    (
        "What is a black hole?",
        "A black hole is a region of space where gravity is so strong that nothing, not even light, can escape once it crosses the boundary called the event horizon. Most form when very massive stars collapse at the end of their lives.",
    ),
    (
        "What does DNA stand for and what does it do?",
        "DNA stands for deoxyribonucleic acid. It is the molecule that stores the genetic instructions of living things: the sequence of its four bases encodes how to build proteins and regulates when they are made.",
    ),
    (
        "What is the difference between a list and a tuple in Python?",
        "Both hold ordered sequences of items, but a list is mutable (you can append, remove or change items) while a tuple is immutable once created. Tuples can therefore be used as dictionary keys and signal that the data should not change.",
    ),
    (
        "What is machine learning?",
        "Machine learning is a way of building programs that improve from data instead of being told every rule. A model is fitted to examples so that it can make predictions or decisions on new inputs it has not seen before.",
    ),
    (
        "Why does ice float on water?",
        "Water expands when it freezes: the molecules lock into an open crystal structure held by hydrogen bonds. Ice is therefore about nine percent less dense than liquid water, so it floats.",
    ),
    (
        "What is a noun?",
        "A noun is a word that names a person, place, thing or idea, such as 'teacher', 'London', 'table' or 'freedom'.",
    ),
    (
        "How do I make a good cup of tea?",
        "Boil fresh water, warm the pot or mug, add one tea bag or a teaspoon of leaves per cup, pour the water on and let it steep for three to five minutes depending on how strong you like it. Remove the tea, then add milk or lemon if you wish.",
    ),
    (
        "What is the greenhouse effect?",
        "The greenhouse effect is the warming of a planet's surface because gases in its atmosphere, such as carbon dioxide, methane and water vapour, let sunlight in but absorb part of the heat radiated back out. Without it Earth would be far colder; adding more of these gases strengthens it.",
    ),
    (
        "What is a variable in programming?",
        "A variable is a name that refers to a value stored in memory. You can read the value through the name and, in most languages, assign a new value to it later.",
    ),
    (
        "Explain what a hash table is.",
        "A hash table stores key-value pairs in an array. A hash function turns each key into an index, so that looking up, inserting or deleting a key takes constant time on average. Collisions, when two keys get the same index, are handled by chaining or probing.",
    ),
    (
        "What causes tides?",
        "Tides are caused mainly by the Moon's gravity pulling on the oceans, with a smaller contribution from the Sun. The water bulges on the side facing the Moon and on the opposite side, so most coasts see two high tides a day.",
    ),
    (
        "What is the difference between a virus and a bacterium?",
        "Bacteria are single-celled living organisms that can reproduce on their own and can often be treated with antibiotics. Viruses are much smaller, are not cells, and can only reproduce inside the cells of a host; antibiotics do not work on them.",
    ),
    (
        "What is a haiku?",
        "A haiku is a short Japanese form of poetry of three lines with five, seven and five syllables. It traditionally captures a single moment in nature and often hints at a season.",
    ),
    (
        "Why is exercise good for you?",
        "Regular exercise strengthens the heart and muscles, improves blood pressure and blood sugar, helps control weight, supports bone density and has clear benefits for mood and sleep.",
    ),
    (
        "What is version control?",
        "Version control is a system that records changes to files over time, so that you can see who changed what, return to earlier versions and merge work done in parallel. Git is the most widely used example.",
    ),
    (
        "What is the speed of light?",
        "In a vacuum light travels at exactly 299,792,458 metres per second, about 300,000 kilometres per second.",
    ),
    (
        "What is an adjective?",
        "An adjective is a word that describes a noun, such as 'red', 'tall' or 'happy' in 'a red car', 'a tall tree' and 'a happy child'.",
    ),
    (
        "What is a neural network?",
        "A neural network is a model made of layers of simple units. Each unit computes a weighted sum of its inputs and applies a non-linear function; the weights are learned from data by gradient descent so that the network maps inputs to the desired outputs.",
    ),
    (
        "How do plants get water?",
        "Plants take up water through their roots by osmosis. It travels up through tubes called xylem to the leaves, pulled by the evaporation of water from the leaf surface, which is called transpiration.",
    ),
    (
        "What is the Pythagorean theorem?",
        "In a right-angled triangle, the square of the hypotenuse equals the sum of the squares of the other two sides: a^2 + b^2 = c^2.",
    ),
    (
        "What is democracy?",
        "Democracy is a system of government in which power comes from the people, who choose their representatives or decide on laws through free and fair elections.",
    ),
    (
        "What is an algorithm?",
        "An algorithm is a finite, well-defined sequence of steps that solves a problem or performs a task, such as sorting a list or finding the shortest route between two places.",
    ),
    (
        "Why do leaves change colour in autumn?",
        "As days shorten, trees stop making chlorophyll, the green pigment of photosynthesis. When it breaks down, yellow and orange pigments that were there all along become visible, and some trees also produce red pigments.",
    ),
    (
        "What is the difference between RAM and storage?",
        "RAM is fast, temporary memory that holds the programs and data in use and is cleared when the computer turns off. Storage, such as an SSD or hard drive, is slower but keeps files permanently.",
    ),
    (
        "What is a metaphor?",
        "A metaphor describes something by saying it is something else, to suggest a likeness without using 'like' or 'as': 'time is a thief' is a metaphor.",
    ),
]

# Hand-written code tasks: (instruction, answer).
CODE = [
    (
        "Write a Python function that returns the factorial of n.",
        "```python\ndef factorial(n: int) -> int:\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result\n```\nFor example, factorial(5) returns 120.",
    ),
    (
        "Write a Python function that checks whether a string is a palindrome.",
        "```python\ndef is_palindrome(text: str) -> bool:\n    cleaned = [c.lower() for c in text if c.isalnum()]\n    return cleaned == cleaned[::-1]\n```\nIt ignores case, spaces and punctuation, so is_palindrome('A man, a plan, a canal: Panama') is True.",
    ),
    (
        "How do I read a file line by line in Python?",
        "Open it in a with block and iterate over the file object:\n```python\nwith open('data.txt', encoding='utf-8') as fh:\n    for line in fh:\n        print(line.rstrip('\\n'))\n```\nThe file is closed automatically at the end of the block.",
    ),
    (
        "Write a Python function that returns the n-th Fibonacci number.",
        "```python\ndef fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```\nfibonacci(0) is 0, fibonacci(1) is 1 and fibonacci(10) is 55.",
    ),
    (
        "How do I remove duplicates from a list in Python while keeping the order?",
        "Use a dictionary, whose keys keep insertion order:\n```python\nunique = list(dict.fromkeys(items))\n```\nFor [3, 1, 3, 2, 1] this gives [3, 1, 2].",
    ),
    (
        "Write a SQL query that counts the orders of each customer.",
        "```sql\nSELECT customer_id, COUNT(*) AS orders\nFROM orders\nGROUP BY customer_id\nORDER BY orders DESC;\n```",
    ),
    (
        "How do I reverse a list in Python?",
        "Either reverse it in place with `items.reverse()`, or make a reversed copy with `items[::-1]` or `list(reversed(items))`.",
    ),
    (
        "Write a Python function that counts the words in a sentence.",
        "```python\ndef count_words(sentence: str) -> int:\n    return len(sentence.split())\n```\nsplit() without arguments splits on any run of whitespace, so extra spaces do not add words.",
    ),
    (
        "How do I sort a list of dictionaries by a key in Python?",
        "Pass a key function to sorted:\n```python\npeople = sorted(people, key=lambda p: p['age'])\n```\nAdd reverse=True to sort from the largest value down.",
    ),
    (
        "Write a shell command that counts the lines of every .py file in a folder.",
        "```sh\nwc -l *.py\n```\nFor a whole tree: `find . -name '*.py' -exec wc -l {} +`.",
    ),
    (
        "What does `git status` show?",
        "It shows the current branch, which files are staged for the next commit, which tracked files have changes that are not staged, and which files are untracked.",
    ),
    (
        "Write a Python function that returns the largest of three numbers without using max.",
        "```python\ndef largest(a, b, c):\n    best = a\n    if b > best:\n        best = b\n    if c > best:\n        best = c\n    return best\n```",
    ),
]

FOLLOW_UPS = [
    ("Can you say that more simply?", "In short: {short}"),
    ("Thanks! Can you give me a one-sentence summary?", "{short}"),
]

WORDS = [
    "garden",
    "window",
    "river",
    "pencil",
    "rocket",
    "planet",
    "guitar",
    "lantern",
    "meadow",
    "castle",
    "bridge",
    "orange",
    "silver",
    "thunder",
    "harbour",
    "blanket",
    "compass",
    "library",
    "mountain",
    "teacher",
]
ITEMS = [
    ("pencils", "pencil"),
    ("apples", "apple"),
    ("notebooks", "notebook"),
    ("tickets", "ticket"),
    ("candles", "candle"),
    ("stamps", "stamp"),
]
NAMES = ["Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Liam"]


def _money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def arithmetic(rng: random.Random) -> list[dict]:
    """A word problem with its worked answer (computed)."""
    kind = rng.randrange(4)
    name = rng.choice(NAMES)
    if kind == 0:
        plural, _ = rng.choice(ITEMS)
        n, price = rng.randint(3, 12), rng.randint(15, 180)
        total = n * price
        return [
            {
                "role": "user",
                "content": f"{name} buys {n} {plural} at {_money(price)} each. How much does {name} pay in total?",
            },
            {
                "role": "assistant",
                "content": f"{n} x {_money(price)} = {_money(total)}. {name} pays {_money(total)}.",
            },
        ]
    if kind == 1:
        a, b = rng.randint(120, 990), rng.randint(11, 99)
        return [
            {"role": "user", "content": f"What is {a} divided by {b}? Give the quotient and the remainder."},
            {
                "role": "assistant",
                "content": f"{a} = {b} x {a // b} + {a % b}, so the quotient is {a // b} and the remainder is {a % b}.",
            },
        ]
    if kind == 2:
        speed, hours = rng.randint(40, 120), rng.randint(2, 9)
        return [
            {
                "role": "user",
                "content": f"A train travels at {speed} km/h for {hours} hours. How far does it go?",
            },
            {
                "role": "assistant",
                "content": f"Distance = speed x time = {speed} km/h x {hours} h = {speed * hours} km.",
            },
        ]
    whole, pct = (
        rng.choice([80, 120, 150, 200, 250, 360, 400, 640]),
        rng.choice([5, 10, 15, 20, 25, 30, 40, 75]),
    )
    part = whole * pct / 100
    part_text = f"{part:g}"
    return [
        {"role": "user", "content": f"What is {pct}% of {whole}?"},
        {"role": "assistant", "content": f"{pct}% of {whole} is {whole} x {pct}/100 = {part_text}."},
    ]


def conversion(rng: random.Random) -> list[dict]:
    """A unit conversion, sometimes with a follow-up the other way (computed)."""
    if rng.random() < 0.5:
        c = rng.randint(-20, 40)
        f = c * 9 / 5 + 32
        turns = [
            {"role": "user", "content": f"Convert {c} degrees Celsius to Fahrenheit."},
            {
                "role": "assistant",
                "content": f"F = C x 9/5 + 32 = {c} x 1.8 + 32 = {f:g} degrees Fahrenheit.",
            },
        ]
        if rng.random() < 0.5:
            k = c + 273.15
            turns += [
                {"role": "user", "content": "And in kelvin?"},
                {"role": "assistant", "content": f"K = C + 273.15 = {k:.2f} K."},
            ]
        return turns
    km = rng.choice([3, 5, 10, 21, 42, 50, 100, 160])
    miles = km / 1.609344
    return [
        {"role": "user", "content": f"How many miles is {km} kilometres?"},
        {
            "role": "assistant",
            "content": f"One mile is 1.609344 km, so {km} km is {km} / 1.609344 = {miles:.2f} miles.",
        },
    ]


def calendar(rng: random.Random) -> list[dict]:
    """The weekday of a date, or the days between two dates (computed with datetime)."""
    start = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randrange(9000))
    if rng.random() < 0.5:
        return [
            {"role": "user", "content": f"What day of the week was {start.isoformat()}?"},
            {"role": "assistant", "content": f"{start.isoformat()} was a {start.strftime('%A')}."},
        ]
    end = start + datetime.timedelta(days=rng.randint(3, 400))
    return [
        {
            "role": "user",
            "content": f"How many days are there from {start.isoformat()} to {end.isoformat()}?",
        },
        {
            "role": "assistant",
            "content": f"From {start.isoformat()} to {end.isoformat()} there are {(end - start).days} days.",
        },
    ]


def words(rng: random.Random) -> list[dict]:
    """A word or list manipulation (computed)."""
    kind = rng.randrange(4)
    if kind == 0:
        w = rng.choice(WORDS)
        return [
            {"role": "user", "content": f"Spell the word '{w}' backwards."},
            {"role": "assistant", "content": f"'{w}' backwards is '{w[::-1]}'."},
        ]
    if kind == 1:
        w = rng.choice(WORDS)
        vowels = sum(c in "aeiou" for c in w)
        return [
            {"role": "user", "content": f"How many vowels are in the word '{w}'?"},
            {
                "role": "assistant",
                "content": f"'{w}' has {vowels} vowels: {', '.join(c for c in w if c in 'aeiou')}.",
            },
        ]
    numbers = rng.sample(range(1, 100), rng.randint(5, 8))
    if kind == 2:
        return [
            {
                "role": "user",
                "content": f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
            },
            {"role": "assistant", "content": ", ".join(map(str, sorted(numbers))) + "."},
        ]
    chosen = rng.sample(WORDS, 4)
    return [
        {"role": "user", "content": f"Put these words in alphabetical order: {', '.join(chosen)}."},
        {"role": "assistant", "content": ", ".join(sorted(chosen)) + "."},
    ]


def explained(rng: random.Random, question: str, answer: str) -> list[dict]:
    """A hand-written question, sometimes followed by a request for a summary (its first sentence)."""
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.4:
        ask, template = rng.choice(FOLLOW_UPS)
        short = answer.split(". ")[0].rstrip(".") + "."
        turns += [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": template.format(short=short)},
        ]
    return turns


def build(seed: int = 0) -> list[dict]:
    """Every conversation of the set, in a fixed order."""
    rng = random.Random(seed)
    out = []
    for i, (q, a) in enumerate(EXPLAIN):
        out.append({"messages": explained(rng, q, a), "source": f"written-explanation:{i}"})
    for i, (q, a) in enumerate(CODE):
        out.append(
            {
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "source": f"written-code:{i}",
            }
        )
    makers = {
        "generated-arithmetic": arithmetic,
        "generated-conversion": conversion,
        "generated-calendar": calendar,
        "generated-words": words,
    }
    for name, make in makers.items():
        for i in range(60):
            out.append({"messages": make(rng), "source": f"{name}:{i}"})
    for record in out:  # a third of the conversations start with a system prompt
        if rng.random() < 0.33:
            record["messages"] = [{"role": "system", "content": SYSTEM}, *record["messages"]]
    rng.shuffle(out)
    return out


def main() -> None:
    records = build()
    with OUT.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    turns = sum(len(r["messages"]) for r in records)
    print(f"{OUT}: {len(records)} conversations, {turns} turns")


if __name__ == "__main__":
    main()
