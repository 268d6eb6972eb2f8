"""The built-in calibration prompt set: varied, self-written, no external data set.

Exit adapters are trained on the model's *own* continuations of these prompts (self-distillation),
so calibration works offline for any chat model. The set mixes the kinds of text a server sees:
facts, explanations, code, arithmetic, lists, creative writing, rewriting, advice, conversation
and structured output. Held-out evaluation prompts ship beside this file (``eval_prompts.jsonl``,
package data: ``octomil eval``'s default works outside the repository) and share none of these.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def eval_prompts_path() -> Path:
    """The held-out evaluation prompts (JSONL, ``{"prompt": ..., "category": ...}`` per line)."""
    return Path(str(resources.files("octomil.calibrate").joinpath("eval_prompts.jsonl")))


CALIBRATION_PROMPTS: tuple[tuple[str, str], ...] = (
    # facts
    ("factual", "What is the tallest mountain in Africa?"),
    ("factual", "Which planet is closest to the Sun?"),
    ("factual", "Who painted the Mona Lisa?"),
    ("factual", "What language is spoken in Brazil?"),
    ("factual", "How many continents are there, and what are they called?"),
    ("factual", "What is the boiling point of water at sea level in Fahrenheit?"),
    ("factual", "Name the largest ocean on Earth."),
    ("factual", "What is the chemical symbol for gold?"),
    # explanations
    ("explain", "Explain how a rainbow forms."),
    ("explain", "Why do leaves change color in autumn?"),
    ("explain", "Explain what a black hole is to a ten-year-old."),
    ("explain", "How does a refrigerator keep food cold?"),
    ("explain", "What causes the seasons on Earth?"),
    ("explain", "Explain the difference between weather and climate."),
    ("explain", "How do vaccines help the immune system?"),
    ("explain", "Why is the ocean salty?"),
    ("explain", "Explain what inflation means in economics."),
    # code
    ("code", "Write a Python function that reverses a string."),
    ("code", "Write a Python function to check whether a number is prime."),
    ("code", "Write a JavaScript function that returns the largest number in an array."),
    ("code", "Show how to read a text file line by line in Python."),
    ("code", "Write a SQL query that counts the rows in a table named orders."),
    ("code", "Write a Python class for a simple bank account with deposit and withdraw methods."),
    ("code", "Explain what a for loop does, with a short Python example."),
    (
        "code",
        "Write a bash command that lists all files larger than 1 MB in the current directory.",
    ),
    ("code", "Write a Python function that computes the factorial of n recursively."),
    # arithmetic and reasoning
    ("math", "What is 15 multiplied by 12?"),
    ("math", "If a train travels 60 miles per hour for 3 hours, how far does it go?"),
    ("math", "Solve for x: 2x + 6 = 14."),
    ("math", "What is 25 percent of 80?"),
    ("math", "A shop sells apples at 3 for 2 dollars. How much do 12 apples cost?"),
    ("math", "Is 91 a prime number? Explain."),
    ("math", "What is the area of a circle with radius 4?"),
    ("math", "Convert 5 kilometers to miles."),
    # lists
    ("list", "List five fruits that are high in vitamin C."),
    ("list", "Give me four tips for getting better sleep."),
    ("list", "Name three famous scientists and what they discovered."),
    ("list", "List the days of the week in French."),
    ("list", "What are five common household pets?"),
    ("list", "List some ways to save water at home."),
    ("list", "Give three reasons to learn a second language."),
    ("list", "Name the primary colors."),
    # creative
    ("creative", "Write a short poem about the moon."),
    ("creative", "Tell me a short story about a dragon who is afraid of fire."),
    ("creative", "Write a haiku about winter."),
    ("creative", "Describe a busy market in the morning."),
    ("creative", "Write the opening line of a mystery novel."),
    ("creative", "Invent a name and a slogan for a new coffee shop."),
    ("creative", "Write a limerick about a cat."),
    ("creative", "Describe the sound of rain on a tin roof."),
    # rewriting and summarising
    ("rewrite", "Rewrite this sentence to sound more formal: hey, can u send me the file asap?"),
    (
        "rewrite",
        "Summarize in one sentence: The meeting was moved from Monday to Wednesday because "
        "the manager was travelling, and everyone must bring their quarterly reports.",
    ),
    ("rewrite", "Translate to Spanish: Good morning, how are you today?"),
    (
        "rewrite",
        "Make this sentence shorter: In the event that it rains, the picnic will be "
        "postponed until a later date.",
    ),
    ("rewrite", "Correct the grammar: She don't like going to school on mondays."),
    ("rewrite", "Turn this into a question: The library opens at nine."),
    ("rewrite", "Paraphrase: Practice makes perfect."),
    # advice
    ("advice", "How can I stay focused while studying?"),
    ("advice", "What should I pack for a weekend camping trip?"),
    ("advice", "How do I prepare for a job interview?"),
    ("advice", "What are good habits for a healthy lifestyle?"),
    ("advice", "How can I make my presentation more engaging?"),
    ("advice", "What is a good way to start learning to cook?"),
    ("advice", "How should I water a cactus?"),
    # conversation
    ("chat", "Hi! How are you today?"),
    ("chat", "Can you tell me a joke?"),
    ("chat", "What is your favorite book and why?"),
    ("chat", "I am feeling a bit bored. Any ideas?"),
    ("chat", "Thank you for your help yesterday!"),
    ("chat", "What can you help me with?"),
    ("chat", "Good night!"),
    # structured output
    (
        "structured",
        "Return a JSON object with the keys name and age for a person called Ana who is 31.",
    ),
    (
        "structured",
        "Write a markdown table with two columns, country and capital, for three countries.",
    ),
    ("structured", "Give a YAML list of three programming languages."),
    ("structured", "Write a CSV header and two rows for a list of books with title and author."),
    ("structured", "Format the date March 5, 2021 in ISO 8601."),
    ("structured", "Write a numbered list of the steps to make a cup of tea."),
    ("structured", "Return only the word yes or no: is the Earth round?"),
    ("structured", "Write an email subject line for a team lunch invitation."),
    ("structured", "Give a one-word answer: what color is the sky on a clear day?"),
)
