"""Handlers of the product-review pipeline (standard library only).

parse      -> cleans and validates a review
sentiment  -> Sentiment.score: lexicon-based score; angry reviews get priority "high"
escalate   -> opens a support ticket (through the priority-router policy, or the ticket flow)
aspects    -> fan-out: one message per product aspect the review talks about
tally      -> Tally.add: running mentions and average sentiment per aspect
"""

import hashlib
import os
import re
import time

WORD = re.compile(r"[a-z']+")


def parse(review):
    """Validate and normalise one review: {"id", "product", "rating", "text"}."""
    if not isinstance(review, dict):
        raise ValueError("a review is a JSON object, got %s" % type(review).__name__)
    text = str(review.get("text", "")).strip()
    if not text:
        raise ValueError("review %r has no text" % review.get("id"))
    rating = int(review.get("rating", 3))
    if not 1 <= rating <= 5:
        raise ValueError("rating must be 1..5, got %d" % rating)
    return {
        "id": str(review.get("id", "")),
        "product": str(review.get("product", "unknown")),
        "rating": rating,
        "text": " ".join(text.split()),
        "words": WORD.findall(text.lower()),
    }


class Sentiment:
    """Scores a review with a small lexicon; negations flip the next few words."""

    POSITIVE = {
        "great", "good", "excellent", "love", "loved", "amazing", "perfect", "fast",
        "comfortable", "crisp", "bright", "solid", "happy", "recommend", "best", "easy",
        "sturdy", "quiet", "clear", "works",
    }
    NEGATIVE = {
        "bad", "poor", "terrible", "awful", "hate", "broke", "broken", "slow", "dead",
        "cheap", "flimsy", "noisy", "dim", "late", "refund", "disappointed", "worst",
        "useless", "returned", "overpriced", "crashes",
    }
    NEGATIONS = {"not", "no", "never", "don't", "doesn't", "didn't", "isn't", "wasn't"}

    def __init__(self):
        self.window = int(os.environ.get("SENTIMENT_NEGATION_WINDOW", "3"))
        self.scored = 0

    def score(self, review):
        total, flip = 0, 0
        for word in review["words"]:
            if word in self.NEGATIONS:
                flip = self.window
                continue
            value = (word in self.POSITIVE) - (word in self.NEGATIVE)
            total += -value if flip else value
            flip = max(0, flip - 1)
        self.scored += 1
        score = max(-1.0, min(1.0, total / 4.0))
        label = "positive" if score > 0.2 else "negative" if score < -0.2 else "neutral"
        out = dict(review, sentiment=round(score, 2), label=label)
        if label == "negative" and review["rating"] <= 2:
            out["priority"] = "high"  # the priority-router policy reads this field
        return out


def escalate(review):
    """Open a (pretend) support ticket for an angry customer.

    The ticket system is slow at times: `latency_s` (seconds, at most 30) simulates it.
    """
    latency = min(max(float(review.get("latency_s") or 0), 0.0), 30.0)
    if latency:
        time.sleep(latency)
    ticket = "T-" + hashlib.sha1(review["id"].encode()).hexdigest()[:8].upper()
    return dict(review, ticket=ticket)


ASPECTS = {
    "battery": {"battery", "charge", "charging", "dead"},
    "sound": {"sound", "bass", "audio", "noisy", "quiet", "loud"},
    "screen": {"screen", "display", "bright", "dim", "crisp"},
    "build": {"build", "flimsy", "sturdy", "broke", "broken", "cheap", "solid"},
    "shipping": {"shipping", "delivery", "arrived", "late", "package"},
    "price": {"price", "overpriced", "value", "money", "refund"},
}


def aspects(review):
    """Fan-out: one message per aspect mentioned ("general" when none is)."""
    words = set(review["words"])
    found = [name for name, keys in sorted(ASPECTS.items()) if words & keys] or ["general"]
    return [
        {
            "review": review["id"],
            "product": review["product"],
            "aspect": name,
            "sentiment": review["sentiment"],
            "ticket": review.get("ticket"),
        }
        for name in found
    ]


class Tally:
    """Running totals per aspect, kept in the runtime process across reviews."""

    def __init__(self):
        self.mentions = {}
        self.sentiment = {}

    def add(self, item):
        aspect = item["aspect"]
        self.mentions[aspect] = self.mentions.get(aspect, 0) + 1
        self.sentiment[aspect] = self.sentiment.get(aspect, 0.0) + item["sentiment"]
        n = self.mentions[aspect]
        return dict(
            item,
            aspect_mentions=n,
            aspect_avg_sentiment=round(self.sentiment[aspect] / n, 2),
        )
