"""The built-in demo task: short product reviews, and an annotator who likes positive ones.

Prompts ask for a review of a product ("anna asks : describe the hotel"); a response is one to three clauses
"the <aspect> was <adjective>" joined by "and", ending with ".". The demonstrations (the SFT data) are
grammatical, on topic and mostly lukewarm or negative, so the SFT policy is fluent but mediocre.

The simulated annotator holds a hidden ground-truth rule, the mean sentiment of the adjectives in a response
(positive 1, neutral 0.5, negative 0; no adjective at all 0). It is only used to label preference pairs (as
human rankers would) and to evaluate samples; PPO never sees it, it optimises the learned reward model.
"""
from __future__ import annotations

import random

NAMES = ["anna", "ben", "carl", "dora", "eve", "finn", "gina", "hugo"]
TEMPLATES = ["{name} asks : review the {topic}", "{name} asks : describe the {topic}",
             "{name} asks : tell me about the {topic}"]
ASPECTS = {
    "food": ["pasta", "soup", "bread", "dessert"],
    "movie": ["plot", "actor", "music", "ending"],
    "hotel": ["room", "staff", "pool", "breakfast"],
    "book": ["story", "writing", "hero", "cover"],
    "phone": ["screen", "battery", "camera", "price"],
}
POSITIVE = ["good", "great", "lovely", "excellent", "perfect"]
NEUTRAL = ["okay", "fine", "average", "plain", "normal"]
NEGATIVE = ["bad", "awful", "poor", "boring", "terrible"]
SENTIMENT = {**{w: 1.0 for w in POSITIVE}, **{w: 0.5 for w in NEUTRAL}, **{w: 0.0 for w in NEGATIVE}}

# How often each kind of adjective appears in the demonstrations: a lukewarm-to-negative SFT policy.
DEMO_WEIGHTS = {"positive": 0.2, "neutral": 0.35, "negative": 0.45}
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def vocabulary() -> list[str]:
    words = SPECIAL_TOKENS + NAMES + ["asks", ":", "review", "describe", "tell", "me", "about", "the", "was", "and", "."]
    words += list(ASPECTS) + [a for aspects in ASPECTS.values() for a in aspects] + POSITIVE + NEUTRAL + NEGATIVE
    seen: list[str] = []
    for w in words:
        if w not in seen:
            seen.append(w)
    return seen


def all_prompts() -> list[tuple[str, str]]:
    """Every (prompt, topic) of the task: 8 names x 3 templates x 5 topics = 120."""
    return [(t.format(name=n, topic=topic), topic) for topic in ASPECTS for n in NAMES for t in TEMPLATES]


def split_prompts(seed: int, eval_fraction: float = 0.2):
    """(train, held-out) prompt lists, a fixed function of ``seed``."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    cut = int(len(prompts) * eval_fraction)
    return prompts[cut:], prompts[:cut]


def demonstration(topic: str, rng: random.Random) -> str:
    """One demonstration review of ``topic`` drawn from the (mediocre) demonstrator distribution."""
    kinds = list(DEMO_WEIGHTS)
    clauses = []
    for aspect in rng.sample(ASPECTS[topic], rng.choice([1, 2, 2, 3])):
        kind = rng.choices(kinds, weights=[DEMO_WEIGHTS[k] for k in kinds])[0]
        adjective = rng.choice({"positive": POSITIVE, "neutral": NEUTRAL, "negative": NEGATIVE}[kind])
        clauses.append(f"the {aspect} was {adjective}")
    return " and ".join(clauses) + " ."


def ground_truth_score(completion: str) -> float:
    """The annotator's hidden rule: mean sentiment of the adjectives; 0 without any adjective."""
    values = [SENTIMENT[w] for w in completion.split() if w in SENTIMENT]
    return sum(values) / len(values) if values else 0.0


def annotate(prompt: str, first: str, second: str):
    """A preference label ``(chosen, rejected)``, or None for a tie (annotators skip those)."""
    a, b = ground_truth_score(first), ground_truth_score(second)
    if a == b:
        return None
    return (first, second) if a > b else (second, first)
