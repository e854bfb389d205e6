"""Facts about countries from the `countryinfo` package's JSON files (offline, MIT)."""
from __future__ import annotations

import ast
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import DataSourceError

# ISO 639-1 codes of the languages countryinfo lists most often -> English names.
LANGUAGE_NAMES = {
    "ar": "Arabic", "bn": "Bengali", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
    "fa": "Persian", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "no": "Norwegian", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish", "sw": "Swahili", "th": "Thai",
    "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese", "cs": "Czech", "da": "Danish",
    "id": "Indonesian", "ms": "Malay", "sr": "Serbian", "hr": "Croatian", "bg": "Bulgarian", "sk": "Slovak",
    "sl": "Slovenian", "et": "Estonian", "lv": "Latvian", "lt": "Lithuanian", "is": "Icelandic",
    "ga": "Irish", "mt": "Maltese", "ka": "Georgian", "hy": "Armenian", "az": "Azerbaijani", "ur": "Urdu",
    "ps": "Pashto", "am": "Amharic", "so": "Somali", "ne": "Nepali", "si": "Sinhala", "ta": "Tamil",
    "km": "Khmer", "lo": "Lao", "my": "Burmese", "mn": "Mongolian", "kk": "Kazakh", "uz": "Uzbek",
}


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    region: str
    subregion: str
    demonym: str
    language: str  # first listed language with a known English name, or ""


def _data_dir() -> Path:
    spec = importlib.util.find_spec("countryinfo")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError("package countryinfo is not installed (pip install countryinfo)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _as_list(value) -> list:
    if isinstance(value, list):
        return value
    try:
        parsed = ast.literal_eval(value) if isinstance(value, str) else []
    except (ValueError, SyntaxError):
        return []
    return parsed if isinstance(parsed, list) else []


@lru_cache(maxsize=1)
def load_countries() -> tuple[Country, ...]:
    """Every country with a name and a capital, sorted by name."""
    countries = []
    for path in sorted(_data_dir().glob("*.json")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        name, capital = str(raw.get("name") or "").strip(), str(raw.get("capital") or "").strip()
        if not name or not capital:
            continue
        languages = [LANGUAGE_NAMES[c] for c in _as_list(raw.get("languages")) if c in LANGUAGE_NAMES]
        countries.append(Country(
            name=name, capital=capital, region=str(raw.get("region") or ""),
            subregion=str(raw.get("subregion") or ""), demonym=str(raw.get("demonym") or ""),
            language=languages[0] if languages else "",
        ))
    if not countries:
        raise DataSourceError(f"no country files found in {_data_dir()}")
    return tuple(sorted(countries, key=lambda c: c.name))
