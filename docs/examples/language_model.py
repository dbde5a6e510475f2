"""Influence on a tiny GPT-2 trained on generated text: which training sequences taught it a query?

Runs on a CPU in under a minute: ``python docs/examples/language_model.py`` (needs ``transformers``).
The text comes from a few templates ("the cat sat on the mat", counting, ...), so the influential
training sequences for a query are easy to judge by eye.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
import transformers

import fninfluence as fi

TEMPLATES = [
    "the {a} sat on the {b} .",
    "a {a} likes the {b} .",
    "count {n} {n1} {n2} {n3} .",
    "the {b} is under the {a} .",
    "the {a} lives in the {home} .",  # a fact per animal: where it lives
    "the {a} sleeps in the {home} .",
]
ANIMALS, THINGS = ["cat", "dog", "fox", "owl"], ["mat", "box", "hat", "rug"]
HOMES = {"cat": "house", "dog": "yard", "fox": "den", "owl": "barn"}
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]


def sentence(rng: random.Random) -> str:
    n, a = rng.randrange(len(NUMBERS) - 3), rng.choice(ANIMALS)
    return rng.choice(TEMPLATES).format(a=a, b=rng.choice(THINGS), home=HOMES[a], n=NUMBERS[n],
                                        n1=NUMBERS[n + 1], n2=NUMBERS[n + 2], n3=NUMBERS[n + 3])


class Vocabulary:
    def __init__(self, texts):
        words = sorted({w for t in texts for w in t.split()})
        self.words = ["<pad>"] + words
        self.index = {w: i for i, w in enumerate(self.words)}

    def encode(self, texts, length):
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.index[w] for w in text.split()][:length]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        return ids, mask


class NextToken(fi.Task):
    """Summed next-token cross-entropy over the real (unpadded) tokens; the measurement is the same loss."""

    def __init__(self, model):
        self.modules = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]

    def compute_train_loss(self, batch, model, sample=False):
        ids, mask = batch
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids[:, 1:]
        if sample:
            with torch.no_grad():
                targets = torch.multinomial(logits.detach().flatten(0, 1).softmax(-1), 1).view_as(targets)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return (losses * mask[:, 1:].flatten()).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def tracked_modules(self):
        return self.modules  # the Conv1D layers; the LM head is tied to the embedding

    def get_attention_mask(self, batch):
        return batch[1]


class AnswerToken(NextToken):
    """The same training loss; the measurement is the loss of the answer alone: the last word before the final
    ".", predicted from everything before it ("barn" in "the owl sleeps in the barn .")."""

    def compute_measurement(self, batch, model):
        ids, mask = batch
        logits = model(input_ids=ids, attention_mask=mask).logits
        rows = torch.arange(len(ids))
        answer = mask.sum(1) - 2  # position of the word before the final "."
        return F.cross_entropy(logits[rows, answer - 1], ids[rows, answer], reduction="sum")


def fact_share(scores: torch.Tensor, texts, animal: str) -> float:
    """The share of the positive influence (the sum of the positive scores) that goes to training sequences stating
    where ``animal`` lives."""
    fact = (f"{animal} lives in the {HOMES[animal]}", f"{animal} sleeps in the {HOMES[animal]}")
    states_fact = torch.tensor([any(f in text for f in fact) for text in texts])
    positive = scores.clamp(min=0)
    return float(positive[states_fact].sum() / positive.sum())


def distinct_top(scores: torch.Tensor, texts, count: int):
    """The ``count`` highest-scored distinct texts (the templates repeat sentences) with their scores."""
    shown = []
    for n in scores.argsort(descending=True).tolist():
        if texts[n] not in [t for t, _ in shown]:
            shown.append((texts[n], scores[n].item()))
        if len(shown) == count:
            return shown
    return shown


def main(seed: int = 0, train_size: int = 400):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    queries = ["the owl sat on the rug .", "count three four five six .", "the owl sleeps in the barn ."]
    texts = []
    while len(texts) < train_size:  # the queries themselves are held out
        text = sentence(rng)
        if text not in queries:
            texts.append(text)
    vocab = Vocabulary(texts + queries)
    length = 8
    ids, mask = vocab.encode(texts, length)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(vocab.words), n_positions=length,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config)
    task = NextToken(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(400):
        batch = torch.randint(0, train_size, (32,))
        loss = task.compute_train_loss((ids[batch], mask[batch]), model) / mask[batch, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    print(f"trained: mean next-token loss {loss.item():.3f}")

    train = torch.utils.data.TensorDataset(ids, mask)
    query_ids, query_mask = vocab.encode(queries, length)
    query_data = torch.utils.data.TensorDataset(query_ids, query_mask)
    factors = fi.fit_factors(model, task, train, strategy="ekfac", batch_size=50, progress=False)
    scores = fi.pairwise_scores(model, task, factors, query_data, train, batch_size=50, progress=False)
    per_token = fi.pairwise_scores(model, task, factors, query_data, train, batch_size=50, per_token=True,
                                   progress=False)
    assert torch.allclose(per_token.sum(-1), scores, rtol=1e-4, atol=1e-3 * float(scores.abs().max()))
    for q, query in enumerate(queries):
        print(f"\nquery: {query!r}")
        shown_texts = []  # the templates repeat sentences: list distinct ones, with their number of copies
        for n in scores[q].argsort(descending=True).tolist():
            if texts[n] not in shown_texts:
                shown_texts.append(texts[n])
                print(f"  {len(shown_texts)}. {scores[q, n].item():+9.1f}  {texts[n]!r} (x{texts.count(texts[n])})")
            if len(shown_texts) == 5:
                break
        bottom = int(scores[q].argmin())
        print(f"  most opposed: {scores[q, bottom].item():+9.1f}  {texts[bottom]!r}")
        best = int(scores[q].argmax())
        words = texts[best].split()
        contributions = per_token[q, best, :len(words)]
        shown = "  ".join(f"{w}:{c:+.0f}" for w, c in zip(words, contributions.tolist()))
        print(f"  per-token view of #1 (score by the position whose next-token prediction carries it): {shown}")

    # The fact query again, measured on its answer token alone ("barn" after "the owl sleeps in the"), with the
    # same factors: only the measurement's gradient changes.
    fact_query = torch.utils.data.TensorDataset(query_ids[2:], query_mask[2:])
    answer = fi.pairwise_scores(model, AnswerToken(model), factors, fact_query, train, batch_size=50,
                                progress=False)[0]
    print(f"\nquery {queries[2]!r}, measured on the answer token alone:")
    for rank, (text, value) in enumerate(distinct_top(answer, texts, 3), 1):
        print(f"  {rank}. {value:+9.1f}  {text!r} (x{texts.count(text)})")
    print(f"share of the positive influence on training sequences that state where the owl lives: whole-sequence "
          f"loss {fact_share(scores[2], texts, 'owl'):.2f}, answer-token loss {fact_share(answer, texts, 'owl'):.2f}")

if __name__ == "__main__":
    main()
