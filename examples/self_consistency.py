"""Self-consistency: fork the question into several sampled reasoning paths that share the
prompt's KV, read each branch's final answer, and vote."""
from __future__ import annotations

from collections import Counter

from runtime.lang import assistant, function, gen, user


@function
def self_consistency(s, question: str, paths: int = 4, temperature: float = 0.7):
    s += user(question + " Think step by step, then give the answer as a number after 'Answer:'.")
    forks = s.fork(paths)
    for i, f in enumerate(forks):
        f += assistant(gen("reasoning", max_tokens=48, stop="Answer:", temperature=temperature, seed=i)
                       + "Answer: " + gen("answer", max_tokens=4, regex=r"[0-9]{1,3}"))
    s.join(forks)
    votes = Counter(f["answer"] for f in forks)
    s += f"Votes: {dict(votes)}\nFinal answer: {votes.most_common(1)[0][0]}"
    return [f["answer"] for f in forks]


if __name__ == "__main__":
    from _backend import backend_from_args

    backend = backend_from_args(__doc__)
    state = self_consistency.run(question="Tom has 3 apples and buys 4 more. How many apples does he have?",
                                 backend=backend)
    print(state.text())
