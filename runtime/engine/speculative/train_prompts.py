"""Prompts for `runtime train-draft`, with no data set at hand, from two sources:

* templates: instruction templates x subjects x styles;
* self-written: the target model writes user turns itself. Sampled from the chat
  template's user-turn prefix (the system turn, then an open user turn), an instruct
  model writes the kind of requests it was tuned to answer (Magpie's observation), with
  a variety of forms and lengths no template list has.

Neither touches the topics of benchmarks/bench_spec.py's chat prompts (HELD_OUT_TOPICS:
the subjects leave them out, self-written prompts that mention one are dropped), so its
accept lengths are not measured on text the head was trained on."""
from __future__ import annotations

import itertools
import logging
import random
import re

from tqdm import tqdm

log = logging.getLogger("runtime.train_draft")

TEMPLATES = [
    "Explain {s} in simple terms.",
    "Write a short story about {s}.",
    "What are the main advantages and disadvantages of {s}?",
    "Give me five interesting facts about {s}.",
    "Write a poem about {s}.",
    "How would you teach {s} to a ten-year-old?",
    "Summarize the history of {s}.",
    "Write a Python function that has something to do with {s}, and explain it.",
    "What are common misconceptions about {s}?",
    "Compare {s} with something similar and describe the differences.",
    "Write an email to a friend about {s}.",
    "List the steps to get started with {s}.",
    "Why is {s} important?",
    "Describe a typical day of someone who works with {s}.",
    "Write a dialogue between two people discussing {s}.",
    "What questions should a beginner ask about {s}?",
    "Write a product description inspired by {s}.",
    "Give a step-by-step plan to learn about {s} in one month.",
    "What will {s} look like in twenty years?",
    "Write a news headline and a short article about {s}.",
    "Answer briefly: what is {s}?",
    "Create a quiz with three questions about {s}, with answers.",
    "Describe {s} using an analogy.",
    "Write a haiku about {s}, then explain it.",
    "What is the most surprising thing about {s}?",
    "Write a blog post introduction about {s}.",
    "How does {s} affect everyday life?",
    "Give me a list of pros and cons of {s}.",
    "Tell me a joke about {s}.",
    "Write a motivational speech that mentions {s}.",
    "What are the biggest challenges related to {s}?",
    "Explain {s} to someone who has never heard of it.",
    "Write a short essay on {s}.",
    "What skills do you need to understand {s}?",
    "Describe {s} in three sentences.",
    "Write a limerick about {s}.",
    "What are three books or resources to learn about {s}?",
    "How has {s} changed over the last hundred years?",
    "Write a letter to a teacher asking about {s}.",
    "Give an example of {s} in a real-world situation.",
    "What would happen if {s} disappeared tomorrow?",
    "Write a recipe-style guide to understanding {s}.",
    "Create an outline for a presentation about {s}.",
    "What ethical questions does {s} raise?",
    "Write a tweet about {s}.",
    "Describe the sounds, sights and smells associated with {s}.",
    "Write a children's story featuring {s}.",
    "What is a fun weekend project involving {s}?",
    "Tell me about {s}.",
    "Describe {s}.",
    "What should I know about {s}?",
    "Give me three tips about {s}.",
    "Explain the science behind {s}.",
    "How do people use {s}?",
]
SUBJECTS = [
    "volcanoes", "the human heart", "climate change", "chess", "the Roman Empire", "electric cars", "honey bees",
    "quantum computing", "the internet", "gardening", "the moon landing", "recycling", "jazz music", "sleep",
    "dinosaurs", "renewable energy", "ancient Egypt", "cooking pasta", "friendship",
    "mountains", "the printing press", "smartphones", "rainforests", "prime numbers", "the solar system",
    "public libraries", "running a marathon", "cats", "bridges", "democracy", "the immune system", "robots",
    "time management", "the Great Wall of China", "sorting algorithms", "volunteering", "the French Revolution",
    "coffee", "tea ceremonies", "deserts", "coral reefs", "glaciers", "hurricanes", "rivers", "penguins",
    "elephants", "octopuses", "wolves", "owls", "butterflies", "mushrooms", "old trees", "cactus plants",
    "the Renaissance", "the Industrial Revolution", "the Silk Road", "the Vikings", "ancient Greece",
    "the Aztec empire", "medieval castles", "the Cold War", "the space race", "the invention of the telephone",
    "electricity", "magnets", "gravity", "light and color", "sound waves", "atoms", "DNA", "evolution",
    "the periodic table", "chemical reactions", "rainbows", "the northern lights", "comets", "Mars", "Jupiter",
    "telescopes", "satellites", "rockets", "submarines", "trains", "bicycles", "sailing", "hot air balloons",
    "video games", "board games", "soccer", "basketball", "tennis", "swimming", "yoga", "meditation",
    "chocolate", "pizza", "sushi", "spices", "vegetarian cooking", "fermentation", "cheese making",
    "painting", "photography", "sculpture", "architecture", "classical music", "rock and roll", "hip hop",
    "opera", "ballet", "theater", "poetry", "novels", "comic books", "movies", "podcasts", "social media",
    "email etiquette", "job interviews", "public speaking", "negotiation", "leadership", "teamwork",
    "personal finance", "saving money", "taxes", "inflation", "cryptocurrency", "small businesses",
    "remote work", "startups", "marketing", "customer service", "supply chains", "shipping containers",
    "databases", "operating systems", "compilers", "encryption", "passwords", "computer viruses",
    "open source software", "web browsers", "spreadsheets", "linked lists", "binary search", "recursion",
    "hash tables", "graphs and networks", "probability", "statistics", "geometry", "fractions", "algebra",
    "calculus", "the number zero", "maps", "time zones", "calendars", "clocks",
    "writing systems", "dictionaries", "translation", "museums", "zoos", "national parks", "camping",
    "hiking", "fishing", "birdwatching", "dogs", "horses", "farming", "bees and pollination", "soil",
    "water purification", "plastic pollution", "wind turbines", "solar panels", "batteries", "nuclear power",
    "cities", "villages", "traffic", "public transport", "skyscrapers", "houses", "furniture", "fashion",
    "knitting", "woodworking", "origami", "magic tricks", "puzzles", "memory", "dreams", "happiness",
    "kindness", "habits", "curiosity", "childhood", "grandparents", "birthdays", "holidays", "weddings",
    "first aid", "nutrition", "vitamins", "the brain", "the eyes", "bones", "muscles", "hospitals",
]
STYLES = ["", " Keep it short.", " Be detailed and give examples.", " Use a friendly, casual tone.",
          " Answer in a numbered list.", " Write it for a professional audience."]


def make_prompts(n: int, seed: int) -> list[str]:
    """n prompt texts, a seeded shuffle of templates x subjects x styles (cycled past all
    combinations)."""
    combos = [t.format(s=s) + st for t, s, st in itertools.product(TEMPLATES, SUBJECTS, STYLES)]
    random.Random(seed).shuffle(combos)
    return [combos[i % len(combos)] for i in range(n)]


# The topics of bench_spec.py's chat prompts (it checks that each of its prompts has one).
# Forms (a poem, a haiku) are shared on purpose: the benchmark asks how the head does on
# familiar kinds of requests about topics it never saw.
HELD_OUT_TOPICS = (
    "refrigerator", "sea", "exercise", "water cycle", "language", "sky", "airplane", "heist", "machine learning",
    "autumn", "bread", "earthquake", "market", "photosynthesis", "black hole", "vaccine",
)
_HELD_OUT = re.compile(r"\b(" + "|".join(re.escape(t) for t in HELD_OUT_TOPICS) + r")(s|es)?\b", re.IGNORECASE)
SENTINEL = "\x00user-turn\x00"


def mentions_held_out(text: str) -> bool:
    return _HELD_OUT.search(text) is not None


def user_turn_prefix(tokenizer) -> list[int] | None:
    """Token ids of a chat up to where the user's message begins (system turn included, as
    the template writes it), or None without a chat template: the prompt from which the
    model writes a user turn."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    cut = text.find(SENTINEL)
    if cut <= 0:
        return None
    return list(tokenizer(text[:cut], add_special_tokens=False)["input_ids"])


def keep_self_written(text: str, finished: bool, seen: set[str]) -> str | None:
    """A self-written user turn worth training on, stripped, or None: it must have ended on
    its own (not cut at the token limit), hold a few words, mention no held-out topic, and
    be new."""
    text = text.strip()
    if not finished or len(text.split()) < 3 or mentions_held_out(text) or text in seen:
        return None
    seen.add(text)
    return text


def generate(core, prompts: list[list[int]], params: list, desc: str) -> list[list[int]]:
    """Continuations of every prompt, in waves of the engine's max_running requests: each
    wave is prefilled together, then decodes in pure decode steps (CUDA-graph replays on a
    GPU) until its last request ends. Admitting a prompt whenever one ends would make
    nearly every step a mixed prefill + decode step, which runs eagerly."""
    wave = core.cfg.max_running
    reqs = []
    with tqdm(total=len(prompts), desc=f"generate ({desc})", unit="seq") as bar:
        for lo in range(0, len(prompts), wave):
            group = [core.add_request(f"train-draft-{desc}-{i}", prompts[i], params[i])
                     for i in range(lo, min(lo + wave, len(prompts)))]
            done = 0
            while core.has_work:
                core.step()
                now = sum(r.finished for r in group)
                if now > done:
                    bar.update(now - done)
                    done = now
            reqs += group
    return [list(r.output_ids) for r in reqs]


def self_written_prompts(core, tokenizer, n: int, seed: int, temperature: float) -> list[str]:
    """Up to n user turns written by the target from its chat template's user-turn prefix
    (see the module docstring), sampled at `temperature` (top-p 0.95); fewer when too many
    candidates fail keep_self_written. Empty without a chat template."""
    from runtime import SamplingParams

    prefix = user_turn_prefix(tokenizer)
    if prefix is None or n <= 0:
        return []
    candidates = n + n // 2 + 8  # some are cut at the limit, repeat, or mention a held-out topic
    params = [SamplingParams(max_tokens=64, temperature=temperature, top_p=0.95, seed=seed * 7_919 + i)
              for i in range(candidates)]
    outs = generate(core, [prefix] * candidates, params, "user turns")
    seen: set[str] = set()
    kept = []
    for out in outs:
        finished = bool(out) and out[-1] in core.eos_ids
        text = keep_self_written(tokenizer.decode(out[:-1] if finished else out, skip_special_tokens=True),
                                 finished, seen)
        if text is not None:
            kept.append(text)
    log.info("self-written prompts: kept %d of %d candidates", len(kept), candidates)
    return kept[:n]
