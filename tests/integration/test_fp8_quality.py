"""FP8 quality gate on the real SmolLM2-135M-Instruct (CPU, FP8 emulated with the GPU's e4m3 rounding).

Perplexity on a held-out text (written for this test, not in the calibration set, >= 2,000 tokens) of the
high-precision model (fp32 on the CPU) and of FP8 static, FP8 dynamic and FP8 + FP8 KV cache.

Gates: FP8 weights and activations <= 1.03x. The FP8 KV cache adds an error no scale can remove: e4m3 keeps 3
mantissa bits, so each cached K/V element is off by ~2.7% (measured per layer, no saturation, no subnormals), and on
this 135M model that alone costs ~1.4% perplexity (the FP8 KV cache with high-precision linears: 1.014x). So FP8
weights + activations + KV cache are gated at <= 1.05x.
"""
from __future__ import annotations

import time

import pytest
import torch

from optimum_nvidia_core.build import Fp8Recipe, perplexity, quantize_model
from optimum_nvidia_core.build.calibration import default_calibration_samples, tokenize_samples
from optimum_nvidia_core.build.calibration_text import CALIBRATION_TEXTS
from optimum_nvidia_core.hub import DEFAULT_MODEL, resolve_model
from optimum_nvidia_core.models.loader import load_model

MAX_RATIO = 1.03
MAX_RATIO_FP8_KV = 1.05
CALIBRATION_SAMPLES = 24  # of the default set (the engine default, 64, takes all ~45: slower here)
CALIBRATION_MAX_LENGTH = 256

HELD_OUT_TEXT = """\
The Long Afternoon at Harrow Street Library

Every town has a building that outlives the purpose it was built for. In ours it was the library on Harrow Street, \
a squat brick hall with tall arched windows that had been a corn exchange, then a drill hall, then for a few \
confused years a roller-skating rink, before the council finally filled it with shelves in 1952. By the time I \
started working there, the floorboards still carried faint painted lines from the rink, and children liked to \
follow them between the stacks as if they were tracks in snow.

The head librarian, Mrs. Okafor, ran the place with a calm that bordered on the supernatural. She could tell from \
the sound of the door whether a visitor wanted a novel, a tax form or simply somewhere warm to sit, and she \
treated all three needs as equally serious. "A library is the only building in town where nobody has to buy \
anything to belong," she told me on my first day, handing me a box of returned books that smelled faintly of \
rain. "Our job is to keep it that way."

Most afternoons were quiet. Retired engineers read the newspapers in the same chairs they had occupied for a \
decade; students from the technical college spread their notes across the long oak table; a man who never gave \
his name came in every Thursday to borrow exactly three books about ships. I learned the rhythm of the place the \
way you learn a piece of music: the lull after lunch, the rush at half past three when the primary school let \
out, the hour before closing when people lingered as if the building were reluctant to let them go.

Then, one October, the council announced that the library would close at the end of the year. The budget had \
been cut, the roof needed repairs that nobody wanted to pay for, and a consultant's report had concluded that \
"digital provision" would serve residents more efficiently. The notice was pinned to the door on a Monday \
morning. By Monday afternoon, Mrs. Okafor had started a list.

It was not a petition, at least not at first. It was a list of what people used the library for, written in \
their own words on index cards that she left in a shoebox by the issue desk. Some of the answers were what you \
would expect: borrowing books, printing documents, using the computers to apply for jobs. Others were not. One \
card said simply, "It is the only place my daughter reads aloud." Another said, "I come here to be around \
people without having to talk to them." A third, in shaky capitals, said, "I learned English at the Tuesday \
group. Before that I could not read the bus timetable."

By December the shoebox had become four shoeboxes, and the cards covered one entire wall of the reading room. A \
reporter from the regional paper came to photograph them, and then a second reporter, and then a councillor who \
had voted for the closure and who stood in front of the wall for a long time without saying anything. The \
decision was reversed in February. The roof was repaired the following summer, paid for partly by the council \
and partly by a fund-raising concert in which the retired engineers, to everyone's astonishment, turned out to \
be a competent brass band.

I think about that wall often. Institutions are usually defended with numbers, and the numbers are never quite \
enough, because the things that matter most about a shared space are the hardest to count. What saved the \
library was not an argument about efficiency; it was a few hundred small, specific sentences, each of which \
described a life that the building had made slightly larger.

How Bridges Carry Their Loads

A bridge is a machine for moving forces to the ground. Whatever the design, the weight of the deck, the traffic \
and the wind must travel through the structure and into the foundations, and the art of bridge engineering lies \
in choosing a path for those forces that the available materials can bear.

The simplest bridge is a beam laid across a gap. When a load presses down in the middle, the top of the beam is \
squeezed while the bottom is stretched. Timber and steel handle both compression and tension reasonably well, \
which is why short beam bridges are so common. Stone and unreinforced concrete, by contrast, are strong in \
compression but crack easily in tension, so a stone beam can span only a few metres before it snaps.

The arch solves this problem by turning the load into compression alone. Each wedge-shaped stone, or voussoir, \
presses against its neighbours, and the thrust runs along the curve of the arch down to the abutments at either \
end. Roman engineers exploited this principle so successfully that some of their aqueducts still stand two \
thousand years later. The weakness of the arch is that it pushes outward as well as down, so the abutments must \
be massive enough, or the ground firm enough, to resist that sideways thrust.

Suspension bridges reverse the arrangement. Their main cables hang in a curve between tall towers and carry the \
deck through vertical hangers, so the cables are in pure tension. Because steel wire is extraordinarily strong \
in tension, suspension bridges achieve the longest spans in the world, well over a kilometre. The towers are in \
compression, and the cables are anchored into enormous blocks of concrete or rock at each end. The main \
difficulty is stiffness: a light deck hanging from flexible cables can oscillate in the wind, as the collapse of \
the Tacoma Narrows Bridge demonstrated in 1940. Modern designs use aerodynamically shaped decks and dampers to \
prevent such motion.

Cable-stayed bridges look similar but work differently. Instead of hanging from a main cable, the deck is \
supported directly by straight cables running from one or more towers. They are economical for medium spans, \
quick to build segment by segment, and have become the most common choice for new crossings of wide rivers.

A Short Conversation About Sleep

"You look exhausted," said Dana, sliding a cup of coffee across the table.

"I slept maybe four hours," Marcus admitted. "I keep telling myself I will go to bed earlier, and then it is \
one in the morning and I am watching a video about how pencils are made."

"Was it a good video?"

"It was a great video. That is the problem."

Dana laughed. "My sister had the same habit. What helped her was putting the phone on the other side of the \
room. If she wanted to check it, she had to actually get out of bed, and most nights she could not be bothered."

"That sounds suspiciously simple."

"Simple is not the same as easy. She also started getting up at the same time every day, even on weekends, \
which she hated for about two weeks and then stopped noticing. Apparently the wake-up time matters more than \
the bedtime, because it anchors your body clock."

Marcus stirred his coffee thoughtfully. "So the plan is: exile the phone, fixed alarm, and stop drinking \
coffee at four in the afternoon?"

"I did not say anything about the coffee," Dana said, glancing at his cup. "But now that you mention it."

Notes on a Small Program

The following function counts how often each word appears in a text file and prints the ten most common words. \
It lowercases everything and strips punctuation so that "River," and "river" are counted together.

    import collections
    import string
    import sys

    def top_words(path, n=10):
        counts = collections.Counter()
        table = str.maketrans("", "", string.punctuation)
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                words = line.lower().translate(table).split()
                counts.update(words)
        return counts.most_common(n)

    if __name__ == "__main__":
        for word, count in top_words(sys.argv[1]):
            print(f"{count:6d}  {word}")

Two details are worth noticing. First, the file is read one line at a time, so even a very large file never \
has to fit in memory at once. Second, the translation table is built once, outside the loop, rather than for \
every line. A more careful version would also handle apostrophes, so that "don't" is not turned into "dont", and \
would skip common words such as "the" and "and", which otherwise dominate the results of almost any English text.

A Letter to the Allotment Committee

Dear members of the committee,

I am writing about the proposal to replace the shared tool shed on the east side of the allotments with \
individual storage lockers. I understand the reasons: tools have gone missing, the shed roof leaks, and several \
plot holders have complained that the shed is always untidy. I agree that something needs to change. However, I \
would ask the committee to consider repairing the shed and introducing a simple sign-out book before committing \
to lockers.

The shed does more than store tools. New plot holders, who often cannot afford a full set of equipment, rely on \
the shared spades, forks and wheelbarrows during their first season. It is also where most of us meet, swap \
seedlings and ask for advice. Individual lockers would solve the problem of missing tools, but they would also \
quietly remove one of the few places where people who grow food side by side actually talk to each other.

I would be happy to help organise a working day to fix the roof, and I know at least four other plot holders \
who have offered to do the same. Thank you for considering this suggestion.

Yours sincerely,
Ruth Abernethy, plot 17

On Learning to Estimate

Scientists and engineers are often admired for precise answers, but much of their real skill lies in rough ones. \
Before a calculation is done carefully, it is worth asking what a sensible answer would look like. How many \
piano tuners work in a city of a million people? Nobody knows exactly, but if one household in twenty owns a \
piano, pianos are tuned once a year, and a tuner can service about a thousand pianos a year, then a city of \
four hundred thousand households needs roughly twenty tuners. The estimate may be off by a factor of two, yet it \
rules out answers of two or two thousand, and that alone catches many mistakes.

The habit of estimating protects against errors of units and orders of magnitude, which are among the most \
expensive mistakes in practice. A spacecraft has been lost because one team worked in pound-seconds and another \
in newton-seconds; medication errors often involve a misplaced decimal point. An engineer who expects an answer \
of about fifty and sees five thousand on the screen will stop and check, while one who has no expectation will \
simply write the number down.

Estimation also changes how people think about uncertainty. Instead of a single confident figure, a good \
estimate comes with a sense of its own range: probably between ten and forty, almost certainly not above a \
hundred. Learning to say this honestly, and to revise it as evidence arrives, is a large part of what it means \
to reason well about the world.
"""


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    model_dir = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model_dir, tokenizer


def test_held_out_text_is_long_and_not_calibration_data(smollm2):
    _, tokenizer = smollm2
    assert len(tokenizer(HELD_OUT_TEXT)["input_ids"]) >= 2000
    assert not any(sample[:60] in HELD_OUT_TEXT for sample in CALIBRATION_TEXTS)


def test_fp8_perplexity_within_3_percent_of_high_precision(smollm2):
    model_dir, tokenizer = smollm2
    token_ids = tokenizer(HELD_OUT_TEXT)["input_ids"]
    calibration = tokenize_samples(tokenizer, default_calibration_samples()[:CALIBRATION_SAMPLES],
                                   CALIBRATION_MAX_LENGTH)
    start = time.perf_counter()
    baseline = perplexity(load_model(model_dir, torch.float32, "cpu"), token_ids)
    figures = {"fp32 (reference)": baseline}
    # One static build carries KV scales too: scored with the high-precision cache and with the FP8 cache.
    static = Fp8Recipe(activation_scheme="static", kv_cache_dtype="fp8")
    model = quantize_model(load_model(model_dir, torch.float32, "cpu"), static, calibration, progress=False)
    figures["fp8 static"] = perplexity(model, token_ids, kv_cache_dtype="auto")
    figures["fp8 static + fp8 kv"] = perplexity(model, token_ids, kv_cache_dtype="fp8")
    dynamic = Fp8Recipe(activation_scheme="dynamic")
    model = quantize_model(load_model(model_dir, torch.float32, "cpu"), dynamic, calibration, progress=False)
    figures["fp8 dynamic"] = perplexity(model, token_ids)
    print(f"\nSmolLM2-135M-Instruct perplexity on {len(token_ids)} held-out tokens "
          f"({time.perf_counter() - start:.0f} s, GPTQ-rounded e4m3 weights, per-channel scales):")
    for name, value in figures.items():
        print(f"  {name:22s} {value:8.3f}  ({value / baseline:.4f}x)")
    for name, value in figures.items():
        limit = MAX_RATIO_FP8_KV if "fp8 kv" in name else MAX_RATIO
        assert value / baseline <= limit, f"{name}: perplexity {value:.3f} vs {baseline:.3f} (fp32), limit {limit}x"
