"""Few-shot question answering with `select`: the model picks the answer it finds likeliest
(mean token logprob) among given choices, after a few solved examples."""
from __future__ import annotations

from runtime.lang import function, gen, select

EXAMPLES = [
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
]


@function
def few_shot_qa(s, question: str, choices: list[str]):
    s += "Answer each question with a city.\n\n"
    for q, a in EXAMPLES:
        s += f"Question: {q}\nAnswer: {a}\n\n"
    s += f"Question: {question}\nAnswer: " + select("answer", choices=choices)
    s += "\nWhy: " + gen("why", max_tokens=16, stop="\n")


if __name__ == "__main__":
    from _backend import backend_from_args

    backend = backend_from_args(__doc__)
    state = few_shot_qa.run(question="What is the capital of France?", choices=["Paris", "London", "Lyon"],
                            backend=backend)
    print(state.text())
    print("answer:", state["answer"], state.get_meta_info("answer")["mean_logprobs"])
