"""JSON extraction with `json_schema`: the answer is constrained to the schema (the engine's
grammar decoding), so it always parses."""
from __future__ import annotations

import json

from runtime.lang import assistant, function, gen, system, user

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 20},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@function
def extract_person(s, text: str):
    s += system("You extract facts as JSON.")
    s += user(f"Extract the person's name, age and city from: {text}")
    s += assistant(gen("person", max_tokens=64, json_schema=PERSON))


if __name__ == "__main__":
    from _backend import backend_from_args

    backend = backend_from_args(__doc__)
    state = extract_person.run(text="Ada Lovelace, 36, lived in London.", backend=backend)
    print(json.loads(state["person"]))
