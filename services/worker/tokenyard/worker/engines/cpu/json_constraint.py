"""A character-level pushdown automaton for one JSON object (RFC 8259), for guided decoding.

The automaton accepts exactly the prefixes of documents ``ws* object``: it says whether a
character may come next, never what the model should write. Two limits keep a constrained model
from running on without end where JSON itself sets none: a run of insignificant whitespace is
capped, and so is the nesting depth. Once the object closes nothing more is accepted; the engine
then ends the sequence.
"""

from __future__ import annotations

_WHITESPACE = frozenset(" \t\n\r")
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPES = frozenset('"\\/bfnrt')
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}

# What the automaton expects next. Structural states allow whitespace before what they expect.
_START = 0  # the opening brace of the document
_OBJECT_FIRST = 1  # a key or "}"
_OBJECT_KEY = 2  # a key (after ",")
_COLON = 3
_VALUE = 4  # a value (after ":" or "," in an array)
_ARRAY_FIRST = 5  # a value or "]"
_AFTER_VALUE = 6  # "," or the closer of the innermost container
_STRING = 7
_ESCAPE = 8  # after a backslash
_UNICODE = 9  # inside \uXXXX
_LITERAL = 10  # inside true / false / null
_MINUS = 11  # "-": a digit must follow
_ZERO = 12  # integer part "0": no more digits
_INTEGER = 13  # integer part [1-9][0-9]*
_DOT = 14  # ".": a digit must follow
_FRACTION = 15
_EXPONENT = 16  # "e" / "E": a sign or a digit
_EXPONENT_SIGN = 17  # a digit must follow
_EXPONENT_DIGITS = 18
_DONE = 19

_STRUCTURAL = frozenset((_START, _OBJECT_FIRST, _OBJECT_KEY, _COLON, _VALUE, _ARRAY_FIRST, _AFTER_VALUE))
# A number has no closing character: it ends at the first character that cannot extend it.
_NUMBER_ENDS = frozenset((_ZERO, _INTEGER, _FRACTION, _EXPONENT_DIGITS))

MAX_WHITESPACE_RUN = 8
"""Room for a newline and an indent, not for a model that would rather pad than write."""
MAX_DEPTH = 64


class JsonObjectAutomaton:
    """Feed characters with :meth:`advance`; :attr:`complete` once the object has closed.

    A rejected character leaves the automaton in an unspecified state: check a candidate on a
    :meth:`copy`. Copies are cheap, as the container stack is an immutable string.
    """

    __slots__ = ("_key", "_pending", "_stack", "_state", "_whitespace", "max_depth", "max_whitespace")

    def __init__(self, *, max_whitespace: int = MAX_WHITESPACE_RUN, max_depth: int = MAX_DEPTH) -> None:
        self._state = _START
        self._stack = ""  # "o" per open object, "a" per open array, innermost last
        self._key = False  # the string being read is an object key
        self._pending: str | int = ""  # the rest of a literal, or the hex digits left of a \u escape
        self._whitespace = 0
        self.max_whitespace = max_whitespace
        self.max_depth = max_depth

    def copy(self) -> JsonObjectAutomaton:
        other = JsonObjectAutomaton.__new__(JsonObjectAutomaton)
        other._state = self._state
        other._stack = self._stack
        other._key = self._key
        other._pending = self._pending
        other._whitespace = self._whitespace
        other.max_whitespace = self.max_whitespace
        other.max_depth = self.max_depth
        return other

    @property
    def complete(self) -> bool:
        return self._state == _DONE

    @property
    def depth(self) -> int:
        return len(self._stack)

    def advance_text(self, text: str) -> bool:
        """Advance over every character of ``text``; False at the first one not allowed."""
        return all(self.advance(char) for char in text)

    def advance(self, char: str) -> bool:
        """Take one character; False if no JSON object document continues with it."""
        state = self._state
        if state == _STRING:
            if char == '"':
                self._key_or_value_done()
            elif char == "\\":
                self._state = _ESCAPE
            elif char < " ":  # control characters must be escaped
                return False
            return True
        if state in _STRUCTURAL:
            return self._structural(state, char)
        if state == _ESCAPE:
            if char == "u":
                self._state, self._pending = _UNICODE, 4
                return True
            if char in _ESCAPES:
                self._state = _STRING
                return True
            return False
        if state == _UNICODE:
            if char not in _HEX:
                return False
            assert isinstance(self._pending, int)
            self._pending -= 1
            if self._pending == 0:
                self._state = _STRING
            return True
        if state == _LITERAL:
            assert isinstance(self._pending, str)
            if not self._pending.startswith(char):
                return False
            self._pending = self._pending[1:]
            if not self._pending:
                self._value_done()
            return True
        if state == _DONE:
            return False
        return self._number(state, char)

    # -- parts ------------------------------------------------------------------------------

    def _structural(self, state: int, char: str) -> bool:
        if char in _WHITESPACE:
            self._whitespace += 1
            return self._whitespace <= self.max_whitespace
        self._whitespace = 0
        if state == _AFTER_VALUE:
            top = self._stack[-1]
            if char == ",":
                self._state = _OBJECT_KEY if top == "o" else _VALUE
                return True
            return self._close(char, top)
        if state == _VALUE:
            return self._value(char)
        if state in (_OBJECT_FIRST, _OBJECT_KEY):
            if char == '"':
                self._state, self._key = _STRING, True
                return True
            return state == _OBJECT_FIRST and self._close(char, "o")
        if state == _COLON:
            if char == ":":
                self._state = _VALUE
                return True
            return False
        if state == _ARRAY_FIRST:
            return self._close(char, "a") or self._value(char)
        # _START: the document is an object, nothing else.
        return char == "{" and self._open("o")

    def _value(self, char: str) -> bool:
        if char == '"':
            self._state, self._key = _STRING, False
        elif char == "{":
            return self._open("o")
        elif char == "[":
            return self._open("a")
        elif "1" <= char <= "9":
            self._state = _INTEGER
        elif char == "0":
            self._state = _ZERO
        elif char == "-":
            self._state = _MINUS
        elif char in _LITERALS:
            self._state, self._pending = _LITERAL, _LITERALS[char]
        else:
            return False
        return True

    def _open(self, kind: str) -> bool:
        if len(self._stack) >= self.max_depth:
            return False
        self._stack += kind
        self._state = _OBJECT_FIRST if kind == "o" else _ARRAY_FIRST
        return True

    def _close(self, char: str, top: str) -> bool:
        if (char == "}" and top == "o") or (char == "]" and top == "a"):
            self._stack = self._stack[:-1]
            self._value_done()
            return True
        return False

    def _value_done(self) -> None:
        self._state = _AFTER_VALUE if self._stack else _DONE

    def _key_or_value_done(self) -> None:
        if self._key:
            self._state, self._key = _COLON, False
        else:
            self._value_done()

    def _number(self, state: int, char: str) -> bool:
        digit = "0" <= char <= "9"
        if state in (_INTEGER, _FRACTION, _EXPONENT_DIGITS) and digit:
            return True
        if state == _MINUS:
            if not digit:
                return False
            self._state = _ZERO if char == "0" else _INTEGER
            return True
        if state in (_DOT, _EXPONENT_SIGN):
            if not digit:
                return False
            self._state = _FRACTION if state == _DOT else _EXPONENT_DIGITS
            return True
        if state == _EXPONENT:
            if digit:
                self._state = _EXPONENT_DIGITS
            elif char == "+" or char == "-":
                self._state = _EXPONENT_SIGN
            else:
                return False
            return True
        if char == "." and state in (_ZERO, _INTEGER):
            self._state = _DOT
            return True
        if (char == "e" or char == "E") and state != _EXPONENT_DIGITS:
            self._state = _EXPONENT
            return True
        # The number ended before this character, which now has to follow a value.
        assert state in _NUMBER_ENDS
        self._state = _AFTER_VALUE
        return self._structural(_AFTER_VALUE, char)
