"""Token ids to text as they come, with OpenAI's stop strings: what ``s1fast serve`` sends of each choice.

``TextStream``: the text of a token sequence decoded incrementally (each token once; a character whose bytes span
tokens waits for its last byte), cut before the first stop string found in it, and ``take()``, the text not sent yet
but for a tail that may begin a stop string (held until it is settled). ``ChoiceText``: one choice's parts (chat: the
thinking, where stop strings are not searched, and the answer; a completion: its whole text, stop strings searched
from the answer on) and ``finish``, the engine's row as the client gets it when a stop string ended it.
"""

from __future__ import annotations

import dataclasses


class TextStream:
    """The text of a token sequence, decoded as its tokens come (each token once: from the last one that
    completed a character), cut before the first stop string found in it past ``armed`` (a character index;
    None: stop strings are not searched, as in the thinking)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), armed: bool = True):
        self.tokenizer, self.stops = tokenizer, stops
        self.longest = max(map(len, stops), default=0)
        self.ids: list[int] = []
        self.clean = 0  # ids decoded into text (an incomplete character waits for its next bytes)
        self.text, self.sent = "", 0  # sent: characters of text handed out by take()
        self.armed = 0 if stops and armed else None
        self.stopped = False

    def arm(self) -> None:
        """Search the stop strings in the text from here on."""
        if self.stops and self.armed is None:
            self.armed = len(self.text)

    def add(self, token: int) -> bool:
        """Take the next token; True when it completed a stop string (the text now ends before it)."""
        self.ids.append(token)
        tail = self.tokenizer.decode(self.ids[self.clean :])
        if tail.endswith("\ufffd"):  # an incomplete character: it waits for its next bytes, the text before it is final
            return self._extend(tail.rstrip("\ufffd"), commit=False)
        return self._extend(tail)

    def flush(self) -> bool:
        """The sequence is over: decode what waited for more bytes; True when that completed a stop string."""
        return self.clean < len(self.ids) and self._extend(self.tokenizer.decode(self.ids[self.clean :]))

    def _extend(self, tail: str, commit: bool = True) -> bool:
        start, text = len(self.text), self.text + tail
        if commit:
            self.text, self.clean = text, len(self.ids)
        if self.armed is None:
            return False
        begin = max(self.armed, start - self.longest + 1)  # a new match ends in the tail
        found = [j for s in self.stops if (j := text.find(s, begin)) >= 0]
        if found:
            self.text, self.stopped = text[: min(found)], True
        return self.stopped

    def take(self, final: bool = False) -> str:
        """The text not taken yet, but for a tail that may begin a stop string (all of it when ``final``)."""
        end = len(self.text)
        if not (final or self.stopped) and self.armed is not None:
            tail = self.text[max(self.armed, self.sent) :]
            for k in range(min(len(tail), self.longest - 1), 0, -1):
                if any(s.startswith(tail[-k:]) for s in self.stops):
                    end -= k
                    break
        new, self.sent = self.text[self.sent : end], max(self.sent, end)
        return new


class ChoiceText:
    """One choice's tokens as they come: the text of its parts (chat: thinking and answer; a completion: its
    whole text, stop strings searched from the answer on) and ``cut``, the token count at which a stop string
    was completed."""

    def __init__(self, tokenizer, chat: bool, stops: tuple[str, ...]):
        self.tokenizer, self.chat = tokenizer, chat
        self.parts = (TextStream(tokenizer), TextStream(tokenizer, stops)) if chat else (
            TextStream(tokenizer, stops, armed=False),)
        self.count = 0
        self.cut: int | None = None

    def feed(self, new: list[int], bounds: tuple[int, int] | None) -> bool:
        """Take a step's tokens (``bounds``: the row's ``(think_end, answer_start)`` once its thinking ended, else
        None); True when one completed a stop string (the later ones are dropped)."""
        for token in new:
            k, self.count = self.count, self.count + 1
            answer = bounds is not None and k >= bounds[1]
            part = self.parts[0]
            if self.chat:
                part = self.parts[1] if answer else part if bounds is None or k < bounds[0] else None
            elif answer:
                part.arm()
            if part is not None and part.add(token):
                self.cut = self.count
                return True
        return False

    def finish(self, row):
        """The engine's row (a ``RowResult``) as the client gets it: when a stop string was completed, its tokens
        end with the one that completed it, its answer before the stop string, its finish_reason "stop"."""
        stopped = [part.flush() for part in self.parts]  # each part: the last bytes of an incomplete character
        if self.cut is None and any(stopped):
            self.cut = self.count
        if self.cut is None:
            return row
        prefix = self.tokenizer.decode(row.tokens[: row.answer_start])
        text = prefix + self.parts[1].text if self.chat else self.parts[0].text
        return dataclasses.replace(row, tokens=row.tokens[: self.cut], finish_reason="stop", text=text,
                                   answer=text[len(prefix) :])
