"""How prompts name a trained subject: its instance token, and putting it into a prompt that lacks it."""

from __future__ import annotations

from raydb.config import SubjectConfig

__all__ = ["instance_token", "ensure_token"]


def instance_token(subject: SubjectConfig) -> str:
    """``subject.instance_token``, else the first word of the instance prompt not in the class prompt.

    "a photo of sks dog" vs "a photo of a dog" -> "sks".
    """
    if subject.instance_token:
        return subject.instance_token
    class_words = set(subject.class_prompt.lower().split())
    for word in subject.instance_prompt.split():
        if word.lower() not in class_words:
            return word
    return subject.instance_prompt.split()[-1]


def ensure_token(prompt: str, token: str, class_noun: str | None = None) -> str:
    """Make sure ``prompt`` mentions the subject: if the token is absent, insert it before the class
    noun when that noun appears ("a dog on a beach" -> "a sks dog on a beach"), else prefix it."""
    words = prompt.split()
    if token in words:
        return prompt
    if class_noun and class_noun in words:
        i = words.index(class_noun)
        return " ".join(words[:i] + [token] + words[i:])
    return f"{token} {prompt}"
