"""Generate the tiny data set and tokenizer the runner trains on by default.

Regenerate (from the repository root; the output is byte-identical every run):

    python scripts/make_tiny_assets.py

The task: sentiment with a format check
---------------------------------------
Every row is a one-turn conversation in the layout of the hub data set
``Dahoas/rm-static`` (fields ``prompt``, ``response``, ``chosen``, ``rejected``)::

    prompt:    "\\n\\nHuman: describe the lamp\\n\\nAssistant:"
    answer:    " the lamp was lovely and dull ."

* ``response`` (SFT target) is a well-formed answer whose two adjectives are each
  positive or negative with probability 1/2, i.e. a neutral policy.
* ``chosen`` / ``rejected`` (reward-model pairs):
  - ~80% sentiment pairs: both well-formed, ``chosen`` has strictly more
    positive adjectives than ``rejected``;
  - ~20% format pairs: ``chosen`` well-formed with any sentiment, ``rejected``
    malformed but positive-sounding (adjective soup, repeated item, missing
    "was", missing " .", an extra adjective, or about a different item).

So the reward model should prefer well-formed, positive answers about the item
that was asked about, and PPO should push the SFT policy from ~50% positive
adjectives towards 100% without breaking the format.

Outputs
-------
* ``runner/assets/tiny_data/{train,eval,heldout}.jsonl`` (4000 / 400 / 200 rows)
  and a README. train and eval use the same 40 items; heldout uses 10 other
  items that never occur in train or eval.
* ``runner/assets/tiny_tokenizer/``: a byte-level BPE tokenizer (~1k vocab)
  with OPT's special-token layout (``<s>``=0, ``<pad>``=1, ``</s>``=2,
  ``<unk>``=3; ``</s>`` prepended as BOS, no EOS appended), saved with
  ``save_pretrained``. Every item and adjective is one token after a space.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "runner" / "assets" / "tiny_data"
TOKENIZER_DIR = REPO_ROOT / "runner" / "assets" / "tiny_tokenizer"
REGENERATE_COMMAND = "python scripts/make_tiny_assets.py"

SEED = 1234
SPLIT_SIZES = {"train": 4000, "eval": 400, "heldout": 200}
SENTIMENT_PAIR_FRACTION = 0.8
MAX_DATA_BYTES = 1_500_000

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT
MODEL_MAX_LENGTH = 512

# fmt: off
ITEMS = [
    "lamp", "soup", "movie", "hotel", "book", "chair", "coffee", "garden",
    "train", "pizza", "song", "beach", "phone", "jacket", "cake", "bread",
    "concert", "museum", "bike", "car", "park", "room", "shirt", "tea",
    "salad", "game", "show", "desk", "sofa", "window", "kitchen", "bus",
    "village", "river", "camera", "watch", "bag", "shoes", "cafe", "play",
]
HELDOUT_ITEMS = [
    "mirror", "boat", "guitar", "pillow", "bridge",
    "candle", "sandwich", "castle", "blanket", "tower",
]
POSITIVE = [
    "good", "great", "lovely", "nice", "wonderful", "excellent", "pleasant",
    "charming", "delightful", "superb", "fantastic", "perfect", "beautiful",
    "brilliant", "amazing", "cheerful", "elegant", "splendid", "cozy", "fresh",
]
NEGATIVE = [
    "bad", "awful", "terrible", "horrible", "ugly", "boring", "nasty",
    "dreadful", "poor", "dull", "broken", "dirty", "gloomy", "rude", "noisy",
    "smelly", "shabby", "rotten", "bland", "messy",
]
# fmt: on

PROMPT_FORMAT = "\n\nHuman: {request}\n\nAssistant:"
REQUESTS = ["describe the {item}", "tell me about the {item}", "what was the {item} like?"]

# A few hundred lines of everyday English (plus a little rm-static style
# dialogue) so that the tokenizer also learns merges for ordinary words.
GENERIC_ENGLISH = """\
The weather was warm today, so we walked to the market in the morning.
She opened the window and listened to the rain falling on the roof.
He said that he would call again after lunch, but he never did.
I think it is important to drink enough water every day.
The children played in the yard until it was time for dinner.
We moved to a new city last year and we are still learning the streets.
Could you please tell me how to get to the train station?
The library is open from nine in the morning until six in the evening.
My brother works at a small company that makes software for schools.
They planted tomatoes, beans and carrots in the garden behind the house.
It took us three hours to drive there because of the traffic.
The teacher asked the students to write a short story about their summer.
If you have any questions, feel free to ask me at any time.
There are many ways to cook rice, and each family has its own recipe.
The dog barked at the mailman and then ran back inside.
We should leave early tomorrow if we want to see the sunrise.
Reading before bed helps me relax and fall asleep more easily.
The meeting has been moved to Thursday afternoon at two o'clock.
Please remember to turn off the lights when you leave the room.
The river flows through the valley and into the sea.
Her favorite color is blue, but she also likes green and yellow.
I'm not sure what you mean, could you explain it again?
The store was closed, so we bought bread at the bakery instead.
Learning a new language takes time, patience and a lot of practice.
He fixed the old clock and now it keeps perfect time.
The museum has a large collection of paintings from the last century.
After the storm, the streets were covered with leaves and branches.
You can find more information on the first page of the report.
We watched a film about the history of the city and its people.
The soup needs more salt, and maybe a little pepper as well.
It is a good idea to save some money for the future.
The bus was late again, so I decided to walk to work.
My grandmother told us stories about her childhood on the farm.
The new park has a playground, a small lake and many trees.
They were happy to see each other after so many years.
What time does the concert start, and how long does it last?
The doctor said that I should get more sleep and exercise.
I forgot my umbrella at home, and of course it started to rain.
The mountains looked beautiful in the light of the setting sun.
He is studying to become an engineer at the university.
We need to buy eggs, milk, butter and some fresh fruit.
The hotel was near the beach, and the rooms were clean and quiet.
She has been working on this project for almost six months.
Do you know where I left my keys? I can't find them anywhere.
The computer was slow, so he restarted it and tried again.
Some people prefer tea in the morning, while others need coffee.
The city council will discuss the new plan next week.
It was the first time that she had traveled alone.
The birds sang in the trees as the sun came up.
Let me know if there is anything else I can help you with.
The kitchen smelled of fresh bread and cinnamon.
We talked for hours about books, music and our plans for the future.
The price of the ticket includes a guided tour of the castle.
He wrote a letter to his friend who lived in another country.
In the winter, the lake freezes and people go skating on it.
The report shows that sales have increased over the last year.
You should always check the map before you start a long hike.
My sister likes to paint flowers and landscapes in her free time.
The train arrived on time, which was a pleasant surprise.
They decided to stay at home and watch a movie together.
The old bridge was repaired after the flood damaged it.
It is easier to learn something new when you are curious about it.
The restaurant serves fish, pasta and several kinds of salad.
We could hear music coming from the house next door.
She smiled and thanked him for his help with the boxes.
There is a small shop at the corner that sells newspapers and snacks.
Please send me the document when you have finished reading it.
The students worked together to solve the difficult problem.
My phone battery died, so I could not call you back.
The garden was full of roses, tulips and other flowers.
He likes to run in the park early in the morning.
We are going to visit our cousins during the holidays.
The road was narrow and winding, so we drove slowly.
I would like to order a coffee and a piece of chocolate cake.
The company hired ten new workers this month.
The movie was long, but the ending was worth the wait.
Many people use bicycles to get around the city.
The farmer sold apples and potatoes at the weekly market.
She keeps a journal and writes in it every evening.
The lights went out during the storm and we lit some candles.
This recipe is simple and only needs a few ingredients.
The game ended in a draw after a long and exciting match.
We stopped at a small village to have lunch and stretch our legs.
He was tired after the long day, so he went to bed early.
The office is on the third floor of the building.
Water boils at one hundred degrees Celsius at sea level.
The baby was sleeping, so everyone spoke in quiet voices.
My friend recommended this book, and I enjoyed it very much.
The ship sailed across the ocean for many weeks.
They built a new school on the edge of town.
Could you help me carry these bags to the car?
The sky was clear and we could see thousands of stars.
I usually take the bus, but today I rode my bike.
The festival takes place every summer in the main square.
She wanted to learn how to play the piano when she was young.
It is polite to say thank you when someone helps you.
The cat likes to sleep in the sun near the window.
We had to wait in line for an hour to get tickets.
The new phone has a better camera and a larger screen.
His speech was short, clear and easy to understand.
There was a lot of snow on the ground this morning.
The shop sells shoes, jackets, shirts and bags.
I hope you have a nice weekend and a good rest.
The hospital is just across the street from the station.
My parents have lived in the same house for thirty years.
He made a cup of tea and sat down to read the news.
The forest is home to many animals, such as deer and foxes.
Their house has a big kitchen and a small living room.
The exam was harder than we expected, but we all passed.
We went swimming in the lake and then had a picnic.
The first chapter of the book introduces the main characters.
Please wash your hands before you eat.
The wind was strong, and the waves crashed against the rocks.
He lost his wallet on the bus, but someone returned it.
The city is famous for its old buildings and narrow streets.
She is always the first person to arrive at the office.
We need a bigger table if everyone is coming to dinner.
The weather forecast says it will be sunny all week.
They celebrated her birthday with a cake and lots of balloons.
The lesson today is about the planets of the solar system.
You can pay with cash or with a card.
I have never seen such a big dog before.
The workers finished painting the walls before the weekend.
He plays the guitar in a band with his friends.
The market is busy on Saturday mornings.
Our neighbors invited us over for dinner on Friday.
The path leads through the woods to a quiet lake.
She made a list of everything she needed for the trip.
The internet connection was slow in the small hotel.
We learned a lot from the mistakes we made last year.
The chairs in the waiting room were not very comfortable.
He always wears a hat when he goes outside in the sun.
The town has one cinema, two schools and a small hospital.
If it rains tomorrow, we will stay inside and play games.
The bread is still warm because it just came out of the oven.
Please close the door quietly, the baby is asleep.
They traveled by train from the north to the south of the country.
The answer to the question is on page forty two.
My favorite season is autumn, when the leaves change color.
The police officer helped the old man cross the street.
We bought a new sofa for the living room.
The museum is free on the first Sunday of every month.
The song was playing on the radio all summer.
His car broke down on the way to the airport.
She ordered a salad and a glass of orange juice.
The little boy was afraid of the dark.
Everyone agreed that the plan was a good one.
The lamp on the desk gives a warm and soft light.
We walked along the beach and collected shells.
The team practiced every day before the big game.
I will be back in five minutes, please wait here.
The river was too deep to cross, so we looked for a bridge.
The new manager wants to change the way we work.
He called his mother every Sunday evening.
It was so cold that the water in the bucket turned to ice.
The book was translated into more than twenty languages.
They opened a small cafe near the university.
The flowers need water and a lot of sunlight to grow.
The plane landed safely despite the strong wind.
She wore a red dress and black shoes to the party.
We started the day with a big breakfast of eggs and toast.
The instructions were confusing, so I asked for help.
The village is surrounded by fields and green hills.
He learned to swim when he was seven years old.
The story has a happy ending.
Human: What is a good way to start learning to cook?
Assistant: Start with simple dishes, like pasta or eggs, and practice them until you feel confident.
Human: How can I sleep better at night?
Assistant: Try to go to bed at the same time every day, and avoid screens for an hour before sleep.
Human: Can you recommend a book for a long flight?
Assistant: A light novel or a collection of short stories is a nice choice for a long flight.
Human: Why is the sky blue?
Assistant: Sunlight is scattered by the air, and blue light is scattered more than red light.
Human: What should I pack for a weekend at the beach?
Assistant: Bring a towel, sunscreen, a hat, water and something to read.
Human: How do I make a cup of tea?
Assistant: Boil some water, pour it over the tea bag, wait a few minutes and then remove the bag.
Human: Is it better to rent or to buy a house?
Assistant: It depends on your plans, your savings and how long you want to stay in one place.
Human: What are some fun things to do on a rainy day?
Assistant: You could read a book, bake something, play a board game or watch a movie.
Human: How many legs does a spider have?
Assistant: A spider has eight legs.
Human: Thank you for your help!
Assistant: You're welcome, I'm glad I could help.
Human: Can you tell me a joke?
Assistant: Why did the scarecrow win an award? Because he was outstanding in his field.
Human: What is the capital of France?
Assistant: The capital of France is Paris.
Human: How can I be more productive at work?
Assistant: Make a short list of tasks each morning, and focus on one thing at a time.
Human: What do cats like to eat?
Assistant: Most cats like fish and meat, and they should always have fresh water.
Human: I feel tired all the time. What should I do?
Assistant: Getting enough sleep, eating well and moving a little every day can help, and it may be worth talking to a doctor.
Human: What is the best way to learn a new language?
Assistant: Practice a little every day, listen to native speakers and don't be afraid to make mistakes.
Human: Where do penguins live?
Assistant: Most penguins live in the southern half of the world, many of them near Antarctica.
Human: How do I change a flat tire?
Assistant: Loosen the nuts, lift the car with a jack, replace the wheel and then tighten the nuts again.
Human: Can you help me write a birthday message for my friend?
Assistant: Sure! Happy birthday, I hope your day is full of laughter and good company.
Human: What is two plus two?
Assistant: Two plus two is four.
Human: What's the difference between weather and climate?
Assistant: Weather is what happens on a given day, while climate is the usual pattern over many years.
Human: Should I water my plants every day?
Assistant: Most plants only need water when the soil feels dry, so check it with your finger first.
Human: How long should I boil an egg?
Assistant: About seven minutes for a firm yolk, or five minutes if you like it soft.
Human: Why do leaves change color in the fall?
Assistant: The trees stop making green chlorophyll, so the yellow and red colors can be seen.
Human: I'm nervous about my job interview tomorrow.
Assistant: That's normal. Prepare a few examples of your work, get some rest, and remember to breathe.
Human: What are some healthy snacks?
Assistant: Fruit, nuts, yogurt and raw vegetables are all healthy snacks.
Human: Can you explain what a computer program is?
Assistant: A program is a list of instructions that tells a computer what to do, step by step.
Human: Which is bigger, the sun or the moon?
Assistant: The sun is much bigger than the moon; it only looks similar because it is much farther away.
Human: How do I keep my house clean?
Assistant: Do a little every day, put things back where they belong, and clean the kitchen after each meal.
Human: What is a good name for a dog?
Assistant: Some popular names are Max, Bella, Charlie and Luna.
Human: How do birds fly?
Assistant: Birds flap their wings to push air down and back, which lifts them up and moves them forward.
Human: What should I cook for dinner tonight?
Assistant: How about a simple vegetable soup with fresh bread? It is warm, cheap and easy to make.
Human: Is coffee bad for you?
Assistant: For most adults, a few cups a day is fine, but too much can make it hard to sleep.
Human: How far away is the moon?
Assistant: The moon is about three hundred and eighty thousand kilometers from the earth.
Human: What can I do to help the environment?
Assistant: You can recycle, use less plastic, save energy at home and walk or cycle when possible.
"""


# ---------------------------------------------------------------------------
# Answers and rows
# ---------------------------------------------------------------------------


def make_prompt(rng: random.Random, item: str) -> str:
    return PROMPT_FORMAT.format(request=rng.choice(REQUESTS).format(item=item))


def well_formed(item: str, adj1: str, adj2: str) -> str:
    """The one answer format the reward model should accept (rm-static style leading space)."""
    return f" the {item} was {adj1} and {adj2} ."


def pick_adjectives(rng: random.Random, n_positive: int) -> list[str]:
    """Two distinct adjectives, ``n_positive`` of them positive, in random order."""
    adjs = rng.sample(POSITIVE, n_positive) + rng.sample(NEGATIVE, 2 - n_positive)
    rng.shuffle(adjs)
    return adjs


def neutral_response(rng: random.Random, item: str) -> str:
    """SFT target: each adjective slot is positive or negative with probability 1/2."""
    n_positive = sum(rng.random() < 0.5 for _ in range(2))
    return well_formed(item, *pick_adjectives(rng, n_positive))


def sentiment_pair(rng: random.Random, item: str) -> tuple[str, str]:
    """Both well-formed; chosen has strictly more positive adjectives."""
    n_chosen, n_rejected = rng.choice([(2, 0), (2, 1), (1, 0)])
    chosen = well_formed(item, *pick_adjectives(rng, n_chosen))
    rejected = well_formed(item, *pick_adjectives(rng, n_rejected))
    return chosen, rejected


def malformed_answer(rng: random.Random, item: str, other_items: list[str]) -> str:
    """A positive-sounding answer that breaks the format in one of several ways."""
    p1, p2, p3 = rng.sample(POSITIVE, 3)
    kind = rng.choice(
        ["adjective_soup", "repeated_item", "missing_was", "missing_period", "extra_adjectives", "wrong_item"]
    )
    if kind == "adjective_soup":  # e.g. " lovely great lovely great"
        return " " + " ".join(rng.choice([p1, p2]) for _ in range(rng.randint(3, 6)))
    if kind == "repeated_item":
        return f" the {item} {item} was {p1} and {p2} ."
    if kind == "missing_was":
        return f" the {item} {p1} and {p2} ."
    if kind == "missing_period":
        return f" the {item} was {p1} and {p2}"
    if kind == "extra_adjectives":
        return f" the {item} was {p1} and {p2} and {p3} ."
    other = rng.choice([o for o in other_items if o != item])
    return well_formed(other, p1, p2)  # about a different item


def format_pair(rng: random.Random, item: str, items: list[str]) -> tuple[str, str]:
    """Chosen well-formed with any sentiment; rejected malformed but positive."""
    chosen = well_formed(item, *pick_adjectives(rng, rng.randint(0, 2)))
    return chosen, malformed_answer(rng, item, items)


def make_row(rng: random.Random, items: list[str]) -> dict[str, str]:
    item = rng.choice(items)
    prompt = make_prompt(rng, item)
    response = neutral_response(rng, item)
    if rng.random() < SENTIMENT_PAIR_FRACTION:
        chosen, rejected = sentiment_pair(rng, item)
    else:
        chosen, rejected = format_pair(rng, item, items)
    assert chosen != rejected
    return {"prompt": prompt, "response": response, "chosen": chosen, "rejected": rejected}


def make_split(split: str) -> list[dict[str, str]]:
    split_index = list(SPLIT_SIZES).index(split)
    rng = random.Random(SEED * 100 + split_index)  # an independent stream per split
    items = HELDOUT_ITEMS if split == "heldout" else ITEMS
    return [make_row(rng, items) for _ in range(SPLIT_SIZES[split])]


# ---------------------------------------------------------------------------
# Writing the data
# ---------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_data_readme(path: Path) -> None:
    sizes = ", ".join(f"`{split}.jsonl` ({n} rows)" for split, n in SPLIT_SIZES.items())
    variants = " or ".join(f'"{request}"' for request in REQUESTS[1:])
    text = f"""\
# tiny_data

A tiny synthetic preference data set ("sentiment with a format check") that a
0.5-1M parameter model can learn in minutes on CPU with SFT, reward modelling
and PPO. It and `../tiny_tokenizer/` are generated by
`scripts/make_tiny_assets.py` (seed {SEED}); regenerate them, byte-identically,
from the repository root with:

    {REGENERATE_COMMAND}

## Files

- {sizes}.
- JSON Lines, one object per line, keys `prompt`, `response`, `chosen`,
  `rejected` (all strings): the field layout of the hub data set
  `Dahoas/rm-static`.
- `train` and `eval` are drawn independently from the same {len(ITEMS)} items.
- `heldout` uses {len(HELDOUT_ITEMS)} other items that never occur in `train`
  or `eval`: {", ".join(HELDOUT_ITEMS)}.

## Task

- `prompt`: `"\\n\\nHuman: describe the {{item}}\\n\\nAssistant:"`, or the
  same with {variants}.
- A well-formed answer is `" the {{item}} was {{adj1}} and {{adj2}} ."` (leading
  space, as in rm-static), with two different adjectives out of
  {len(POSITIVE)} positive and {len(NEGATIVE)} negative words.
- `response` (SFT target): a well-formed answer whose adjectives are each
  positive or negative with probability 1/2 (a neutral policy).
- `chosen` / `rejected` (reward modelling):
  - about {SENTIMENT_PAIR_FRACTION:.0%} sentiment pairs: both well-formed, `chosen`
    has strictly more positive adjectives (2 vs 0, 2 vs 1 or 1 vs 0);
  - about {1 - SENTIMENT_PAIR_FRACTION:.0%} format pairs: `chosen` well-formed with
    any sentiment, `rejected` malformed but positive-sounding (adjective soup,
    repeated item, missing "was", missing " .", an extra adjective, or an
    answer about a different item).

A good reward model prefers well-formed, positive answers about the item that
was asked about; PPO should move the SFT policy from about 50% positive
adjectives towards 100% while keeping the format.
"""
    path.write_text(text, encoding="utf-8", newline="\n")


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def training_texts(splits: dict[str, list[dict[str, str]]]) -> list[str]:
    texts = GENERIC_ENGLISH.splitlines()
    for rows in splits.values():
        for row in rows:
            texts.extend(row.values())
    return texts


def train_backend_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE with OPT's special-token ids and a "</s> $A" post-processor."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s>:0 $A:0", pair="</s>:0 $A:0 </s>:1 $B:1", special_tokens=[("</s>", bos_id)]
    )
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
    )


def check_tokenizer(tok, rows: list[dict[str, str]]) -> None:
    """Fail loudly if the tokenizer does not behave as OPT's layout and the task expect."""
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == i, (token, i)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 2, 1, 3)
    assert len(tok) == tok.backend_tokenizer.get_vocab_size() == VOCAB_SIZE, len(tok)
    multi = [w for w in ITEMS + HELDOUT_ITEMS + POSITIVE + NEGATIVE if len(tok.tokenize(" " + w)) != 1]
    assert not multi, f"task words that are not a single token after a space: {multi}"
    samples = [row["prompt"] + row["response"] for row in rows[:50]] + GENERIC_ENGLISH.splitlines()
    for text in samples + ["Ünïcödé ✓ 🙂 tabs\tand\r\nCRLF"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id, text
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text, text


def save_tokenizer(tok, out_dir: Path) -> None:
    """Save with ``save_pretrained`` into a clean folder and check that it reloads identically."""
    from transformers import AutoTokenizer

    if out_dir.exists():
        shutil.rmtree(out_dir)
    tok.save_pretrained(str(out_dir))
    reloaded = AutoTokenizer.from_pretrained(str(out_dir))
    text = GENERIC_ENGLISH[:500]
    assert reloaded(text).input_ids == tok(text).input_ids and len(reloaded) == len(tok)


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def describe_lengths(name: str, lengths: list[int]) -> str:
    return f"{name}: min {min(lengths)}, median {statistics.median(lengths):g}, max {max(lengths)}"


def report(tok, splits: dict[str, list[dict[str, str]]]) -> None:
    for split in SPLIT_SIZES:
        path = DATA_DIR / f"{split}.jsonl"
        print(f"{path.relative_to(REPO_ROOT)}: {len(splits[split])} rows, {path.stat().st_size} bytes")
    for path in sorted(TOKENIZER_DIR.iterdir()):
        print(f"{path.relative_to(REPO_ROOT)}: {path.stat().st_size} bytes")
    print(f"vocab size: {len(tok)}")
    rows = splits["train"]
    prompt = [len(tok(r["prompt"]).input_ids) for r in rows]
    full = [len(tok(r["prompt"] + r["response"]).input_ids) for r in rows]
    pairs = [len(tok(r["prompt"] + r[k]).input_ids) for r in rows for k in ("chosen", "rejected")]
    print("token lengths (train, incl. the </s> BOS):")
    for name, lengths in [("prompt", prompt), ("prompt+response", full), ("prompt+chosen/rejected", pairs)]:
        print("  " + describe_lengths(name, lengths))


def main() -> None:
    splits = {split: make_split(split) for split in SPLIT_SIZES}

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(DATA_DIR / f"{split}.jsonl", rows)
    write_data_readme(DATA_DIR / "README.md")
    total = sum((DATA_DIR / f"{s}.jsonl").stat().st_size for s in SPLIT_SIZES)
    assert total < MAX_DATA_BYTES, f"data too large: {total} bytes"

    tok = wrap_tokenizer(train_backend_tokenizer(training_texts(splits)))
    check_tokenizer(tok, splits["train"])
    save_tokenizer(tok, TOKENIZER_DIR)

    report(tok, splits)


if __name__ == "__main__":
    main()
