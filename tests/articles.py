"""Synthetic articles and CSVs for the data-plane tests (written here; no real article text)."""
from __future__ import annotations

import csv
import random
from pathlib import Path

WORDS = (
    "the team wrote code for a new service and tested every part of it before the release because users "
    "expect software to work well each day we learned something about design data models queries speed "
    "memory errors logs reviews deadlines people habits writing reading teaching building shipping fixing "
    "simple small clear honest careful quick slow better worse good great hard easy first last next other "
    "project product feature bug test change branch commit merge deploy server client browser phone screen"
).split()

GERMAN = ("Die Entwickler haben gestern eine neue Version der Anwendung veröffentlicht. Sie wollten vor allem "
          "die Geschwindigkeit verbessern und einige Fehler beheben, die von den Nutzern gemeldet wurden. "
          "Danach haben sie lange über die nächsten Schritte gesprochen und einen Plan für den Winter gemacht.")
FRENCH = ("Les développeurs ont publié hier une nouvelle version de l'application. Ils voulaient surtout "
          "améliorer la vitesse et corriger quelques erreurs signalées par les utilisateurs. Ensuite, ils ont "
          "longuement discuté des prochaines étapes et ont préparé un plan pour l'hiver.")
SPANISH = ("Los desarrolladores publicaron ayer una nueva versión de la aplicación. Querían sobre todo mejorar "
           "la velocidad y corregir algunos errores que los usuarios habían señalado. Después hablaron mucho de "
           "los próximos pasos y prepararon un plan para el invierno.")

HEADER = ["title", "text", "url", "authors", "timestamp", "tags"]


def english(seed: int, words: int = 120) -> str:
    """A distinct English-looking paragraph (random sentences over a small vocabulary)."""
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        n = rng.randint(6, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
    return " ".join(sentences)


def row(i: int, text: str | None = None, **fields: str) -> list[str]:
    values = {"title": f"Article {i}", "text": text if text is not None else english(i),
              "url": f"https://medium.com/@writer/article-{i}", "authors": "['Ann Writer']",
              "timestamp": "2020-03-0%dT10:00:00Z" % (1 + i % 9), "tags": "['Software', 'Testing']"}
    values.update(fields)
    return [values[h] for h in HEADER]


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header] + rows)
    return path
