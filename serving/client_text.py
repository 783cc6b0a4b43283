"""How answers and logs show text a client sent (a header's value, a form field's or a tensor's name): cut short,
in ASCII. The text is the client's, of any length and any bytes: a 12 MB tensor name shown whole in each of its 64
images' labels cost a request 3 GB and 14 s; a control byte shown as it came could forge a log line."""
from __future__ import annotations


def clipped(text: str, most: int, quoted: bool = False) -> str:
    """``text``'s first ``most`` characters as Python's ascii() writes them, in its quotes only when ``quoted``,
    then "..." when cut."""
    shown = ascii(text[:most])
    return (shown if quoted else shown[1:-1]) + ("..." if len(text) > most else "")
