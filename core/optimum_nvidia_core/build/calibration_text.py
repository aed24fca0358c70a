"""Default FP8 calibration data, written for this project (no download): varied prose, code, data, dialogue.

Calibration only has to show the model the range of activations it meets in use, so the set mixes registers
(narrative, technical, conversational, formal), formats (Python, SQL, JSON, Markdown, shell) and chat-templated
conversations, which put the template's special tokens through the network.
"""

CALIBRATION_TEXTS = [
    # Narrative prose
    "The lighthouse keeper had not spoken to another person in eleven days when the supply boat finally rounded "
    "the northern point. She watched it from the gallery, one hand on the cold iron rail, counting the seconds "
    "between the swells that lifted its bow. The radio had failed on the third day of the storm, and since then she "
    "had kept the log by hand, writing the wind speed, the barometer reading and the state of the lamp every four "
    "hours. When the boat tied up at the jetty, the young deckhand jumped ashore and shouted something she could not "
    "hear over the surf. She laughed anyway, because it was the first human voice in almost two weeks, and because "
    "the sound of it made the island feel suddenly smaller and far less lonely.",
    "My grandfather kept bees behind the orchard, in six white hives that leaned slightly toward the river. Every "
    "August he would put on the veiled hat, light the smoker with dry pine needles, and lift the frames out one by "
    "one, heavy and golden. He never wore gloves. 'They know me,' he said, though I saw him stung more than once and "
    "he only shook his hand and kept working. The honey from the late summer was darker than the spring honey, "
    "almost the colour of strong tea, and it tasted of clover, blackberry and something he called 'the weather'.",
    "At 6:40 on a Tuesday morning, the train from Lyon was already twenty minutes late, and the platform at Gare de "
    "Lyon filled with commuters holding paper cups of coffee. A man in a grey suit argued quietly on the phone; two "
    "students shared a croissant; a small dog in a carrier bag watched the pigeons with total concentration. When the "
    "announcement came, in French and then in English, nobody seemed surprised: a signalling fault near Dijon.",
    # Explanatory and technical prose
    "Photosynthesis converts light energy into chemical energy. In the light-dependent reactions, which take place "
    "in the thylakoid membranes of the chloroplast, water molecules are split, oxygen is released, and the energy "
    "carriers ATP and NADPH are produced. In the Calvin cycle, which runs in the stroma, the enzyme RuBisCO fixes "
    "carbon dioxide onto a five-carbon sugar; the resulting molecules are reduced using ATP and NADPH to form "
    "glyceraldehyde-3-phosphate, the building block of glucose. Roughly one in six fixed carbons leaves the cycle.",
    "A transformer language model reads a sequence of tokens and predicts the next one. Each layer applies "
    "self-attention, in which every position computes a weighted average of the value vectors of earlier positions, "
    "with weights given by the softmax of scaled dot products between queries and keys. A feed-forward network then "
    "transforms each position independently. During generation the keys and values of past tokens are stored in a "
    "cache, so that each new token costs one pass over the weights plus a read of the cache instead of recomputing "
    "the whole prefix. At small batch sizes decoding is limited by memory bandwidth, not arithmetic.",
    "Interest compounds when the interest earned in one period is added to the principal for the next. A deposit of "
    "$1,000 at 5% per year grows to $1,050 after one year, $1,102.50 after two, and about $1,628.89 after ten. "
    "Monthly compounding at the same nominal rate yields slightly more: the effective annual rate is "
    "(1 + 0.05/12)^12 - 1, or about 5.116%. The rule of 72 estimates the doubling time: 72 / 5 = 14.4 years.",
    "The French Revolution began in 1789 amid a fiscal crisis, poor harvests and widespread resentment of privilege. "
    "The Estates-General, summoned for the first time since 1614, transformed itself into a National Assembly, and "
    "on 14 July a Parisian crowd stormed the Bastille. Within three years the monarchy had been abolished; within "
    "five, the Terror had claimed tens of thousands of lives. Historians still debate whether the Revolution was "
    "primarily a political, social or cultural upheaval, and how far its ideals shaped the century that followed.",
    "To replace a bicycle inner tube, first shift to the smallest rear sprocket and open the brake quick-release. "
    "Remove the wheel, then deflate the tube completely. Hook two tyre levers under the bead about ten centimetres "
    "apart and work one bead off the rim. Pull out the old tube and run your fingers carefully around the inside of "
    "the tyre to find the thorn or glass that caused the puncture. Inflate the new tube just enough to give it "
    "shape, insert the valve, tuck the tube in, and push the bead back on with your thumbs, finishing at the valve.",
    "Symptoms of dehydration include thirst, dark yellow urine, dizziness, fatigue and headache. Older adults and "
    "young children are at higher risk, as are people who exercise in hot weather. Mild dehydration can usually be "
    "treated by drinking water or an oral rehydration solution; severe dehydration, with confusion, a rapid heartbeat "
    "or no urine for many hours, needs urgent medical care. This text is general information, not medical advice.",
    # Code
    "def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:\n"
    "    \"\"\"Merge overlapping closed intervals, e.g. [(1, 3), (2, 6), (8, 10)] -> [(1, 6), (8, 10)].\"\"\"\n"
    "    merged: list[tuple[int, int]] = []\n"
    "    for start, end in sorted(intervals):\n"
    "        if merged and start <= merged[-1][1]:\n"
    "            merged[-1] = (merged[-1][0], max(merged[-1][1], end))\n"
    "        else:\n"
    "            merged.append((start, end))\n"
    "    return merged\n\n\n"
    "class LRUCache:\n"
    "    def __init__(self, capacity: int):\n"
    "        from collections import OrderedDict\n"
    "        self.capacity, self.items = capacity, OrderedDict()\n\n"
    "    def get(self, key):\n"
    "        if key not in self.items:\n"
    "            return None\n"
    "        self.items.move_to_end(key)\n"
    "        return self.items[key]\n",
    "SELECT c.customer_id,\n       c.name,\n       COUNT(o.order_id) AS orders,\n"
    "       SUM(o.total_cents) / 100.0 AS revenue\nFROM customers AS c\n"
    "LEFT JOIN orders AS o ON o.customer_id = c.customer_id AND o.created_at >= DATE '2024-01-01'\n"
    "WHERE c.country IN ('DE', 'FR', 'NL')\nGROUP BY c.customer_id, c.name\nHAVING COUNT(o.order_id) > 3\n"
    "ORDER BY revenue DESC\nLIMIT 20;",
    "#include <stdio.h>\n#include <stdlib.h>\n\n"
    "typedef struct Node {\n    int value;\n    struct Node *next;\n} Node;\n\n"
    "Node *reverse(Node *head) {\n    Node *prev = NULL;\n    while (head != NULL) {\n"
    "        Node *next = head->next;\n"
    "        head->next = prev;\n        prev = head;\n        head = next;\n    }\n    return prev;\n}\n\n"
    "int main(void) {\n    Node c = {3, NULL}, b = {2, &c}, a = {1, &b};\n"
    "    for (Node *n = reverse(&a); n; n = n->next) printf(\"%d \", n->value);\n    return EXIT_SUCCESS;\n}\n",
    "const express = require('express');\nconst app = express();\napp.use(express.json());\n\n"
    "const todos = new Map();\nlet nextId = 1;\n\napp.post('/todos', (req, res) => {\n"
    "  const { title } = req.body;\n  if (!title) return res.status(400).json({ error: 'title is required' });\n"
    "  const todo = { id: nextId++, title, done: false };\n  todos.set(todo.id, todo);\n"
    "  res.status(201).json(todo);\n});\n\napp.get('/todos/:id', (req, res) => {\n"
    "  const todo = todos.get(Number(req.params.id));\n  todo ? res.json(todo) : res.sendStatus(404);\n});\n\n"
    "app.listen(3000, () => console.log('listening on :3000'));",
    "$ git log --oneline -5\na1b2c3d Fix off-by-one in pagination\n9f8e7d6 Add retry with exponential backoff\n"
    "5c4b3a2 Bump dependencies\n$ docker build -t web:1.4.2 .\n$ kubectl rollout status deployment/web -n prod\n"
    "deployment \"web\" successfully rolled out\n$ curl -s https://example.com/health | jq .status\n\"ok\"",
    # Structured data and markup
    '{"order_id": "A-10293", "status": "shipped", "items": [{"sku": "KB-204", "qty": 2, "price": 19.99}, '
    '{"sku": "MS-881", "qty": 1, "price": 42.5}], "shipping": {"carrier": "DHL", "tracking": "JD014600003828", '
    '"address": {"city": "Rotterdam", "postcode": "3011 AD", "country": "NL"}}, "paid": true, "notes": null}',
    "# Release notes v2.3.0\n\n## Added\n- Streaming responses for the `/v1/chat` endpoint.\n- `--max-retries` flag "
    "(default: 3).\n\n## Fixed\n- Crash when the config file is empty (#412).\n- Timezone handling in scheduled "
    "jobs.\n\n| Metric | v2.2 | v2.3 |\n|---|---|---|\n| p50 latency | 120 ms | 85 ms |\n| p99 latency | 610 ms | "
    "240 ms |\n| Memory | 1.8 GB | 1.2 GB |",
    "Name,Age,City,Score\nAlice Martin,34,Lisbon,88.5\nBo Chen,27,Taipei,91.0\nCarla Ruiz,45,Bogotá,76.25\n"
    "Dmitri Ivanov,39,Tallinn,82.0\nEmeka Obi,31,Lagos,95.75\nFatima Zahra,29,Casablanca,79.5",
    # Maths and formal reasoning
    "Problem: A train leaves at 09:15 and travels 240 km at an average speed of 80 km/h. When does it arrive?\n"
    "Solution: Time = distance / speed = 240 / 80 = 3 hours. 09:15 + 3:00 = 12:15. The train arrives at 12:15.\n"
    "Problem: Solve 3x - 7 = 2x + 5.\nSolution: Subtract 2x from both sides: x - 7 = 5. Add 7: x = 12. "
    "Check: 3(12) - 7 = 29 and 2(12) + 5 = 29. Correct.\nProblem: What is 15% of 360?\nSolution: 0.15 * 360 = 54.",
    "Theorem. There are infinitely many prime numbers.\nProof. Suppose there were finitely many, p1, p2, ..., pn. "
    "Let N = p1 * p2 * ... * pn + 1. No pi divides N, since dividing N by any pi leaves remainder 1. So N is either "
    "prime itself or divisible by a prime not in the list. Either way the list was incomplete, a contradiction.",
    # Other languages
    "La cuisine italienne varie énormément d'une région à l'autre. Au nord, on cuisine volontiers au beurre et l'on "
    "sert le risotto ou la polenta ; au sud, l'huile d'olive, les tomates et les agrumes dominent. Der Rhein ist "
    "einer der längsten Flüsse Europas und fließt von den Alpen bis zur Nordsee. El flamenco combina el cante, el "
    "toque de guitarra y el baile, y nació en Andalucía. 東京は日本の首都であり、世界有数の大都市である。",
    # Business and everyday writing
    "Subject: Rescheduling Thursday's review\n\nHi Priya,\n\nCould we move Thursday's design review to Friday at "
    "10:00? Two of the reviewers are travelling on Thursday, and I would rather have everyone in the room for the "
    "decision on the storage layer. I've attached the updated proposal; the main change is in section 3, where we "
    "now compare three options instead of two.\n\nThanks, and let me know if Friday doesn't work.\n\nBest,\nTom",
    "Recipe: lemon garlic pasta (serves 2). Ingredients: 200 g spaghetti, 3 tbsp olive oil, 3 cloves garlic thinly "
    "sliced, zest and juice of 1 lemon, a pinch of chili flakes, 40 g grated parmesan, salt, black pepper, a handful "
    "of parsley. Cook the pasta in well-salted water. Meanwhile warm the oil and garlic gently until fragrant, not "
    "brown. Add the zest, chili and a ladle of pasta water, toss in the drained pasta, then the lemon juice and "
    "cheese.",
    "Customer review, 3 out of 5 stars: The headphones sound great and the noise cancelling works well on flights, "
    "but the ear cushions get uncomfortable after about two hours, and the app keeps asking me to log in. Battery "
    "life is as advertised (around 30 hours). For the price I expected a sturdier case. Would buy again on sale.",
    "Terms of service, section 4.2: The Customer shall not (a) sublicense, resell or distribute the Service; "
    "(b) reverse engineer any part of the Service except to the extent permitted by applicable law; or (c) use the "
    "Service to transmit unlawful content. The Provider may suspend access upon written notice if the Customer "
    "materially breaches this section and fails to cure the breach within thirty (30) days.",
    "Poem: Autumn Inventory\n\nThree apples on the sill, one bruised;\na letter I have not yet answered;\n"
    "the radiator's first metallic knock;\nyour scarf, still on the hook, still blue.\n"
    "I count these things the way my mother\ncounted stitches: half aloud,\nso that the losing of one\n"
    "would not go quietly.",
    "Interview transcript.\nQ: What made you start the company?\nA: Honestly, frustration. We were spending three "
    "days every month reconciling invoices by hand.\nQ: And the first customers?\nA: Friends of friends, mostly. "
    "The first one paid us in pizza, which I don't recommend as a business model.\nQ: What would you do "
    "differently?\nA: Hire a second engineer six months earlier.",
]

# Chat-formatted samples: rendered with the model's chat template at calibration time.
CALIBRATION_CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of Australia, and why isn't it Sydney?"},
        {"role": "assistant", "content": "The capital is Canberra. When the colonies federated in 1901, Sydney "
         "and Melbourne both wanted to be the capital, so a compromise site between them was chosen and Canberra "
         "was built as a planned city. Parliament moved there in 1927."},
    ],
    [
        {"role": "user", "content": "Write a Python function that checks whether a string is a palindrome, "
         "ignoring case and punctuation."},
        {"role": "assistant", "content": "```python\nimport re\n\ndef is_palindrome(text: str) -> bool:\n"
         "    cleaned = re.sub(r'[^a-z0-9]', '', text.lower())\n    return cleaned == cleaned[::-1]\n```\n"
         "For example, `is_palindrome('A man, a plan, a canal: Panama')` returns `True`."},
    ],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "hey can u help me pick a name for my cat? she's grey and very lazy"},
        {"role": "assistant", "content": "Sure! A few ideas: Pebble, Smokey, Nimbus, Earl Grey, or Duvet, for "
         "a cat who takes napping seriously."},
        {"role": "user", "content": "haha Duvet is perfect"},
        {"role": "assistant", "content": "Duvet it is. May she nap in peace."},
    ],
    [
        {"role": "user", "content": "Summarize the difference between TCP and UDP in two sentences."},
        {"role": "assistant", "content": "TCP is connection-oriented: it guarantees ordered, reliable delivery "
         "with retransmission and congestion control. UDP sends independent datagrams with no delivery or order "
         "guarantees, trading reliability for lower latency and overhead."},
    ],
    [
        {"role": "system", "content": "You are a travel planner. Reply in JSON."},
        {"role": "user", "content": "Plan one day in Kyoto for someone who likes gardens and food."},
        {"role": "assistant", "content": '{"morning": ["Tofuku-ji gardens", "Fushimi Inari (lower trail)"], '
         '"lunch": "yudofu near Nanzen-ji", "afternoon": ["Philosopher\'s Path", "Ginkaku-ji moss garden"], '
         '"dinner": "Nishiki Market street food, then Pontocho", "budget_jpy": 12000}'},
    ],
    [
        {"role": "user", "content": "Is it safe to eat raw cookie dough?"},
        {"role": "assistant", "content": "It carries some risk: raw flour can carry E. coli and raw eggs can carry "
         "Salmonella. Heat-treated flour and pasteurized eggs, or dough sold as 'safe to eat raw', avoid most of it."},
        {"role": "user", "content": "How do I heat-treat flour at home?"},
        {"role": "assistant", "content": "Spread it on a baking tray and bake at 175 °C (350 °F) for about 5 "
         "minutes, until it reaches 74 °C (165 °F) throughout, stirring once. Let it cool and sift out clumps."},
    ],
    [
        {"role": "user", "content": "Translate into German: 'The meeting has been moved to next Monday.'"},
        {"role": "assistant", "content": "Das Meeting wurde auf nächsten Montag verschoben."},
    ],
    [
        {"role": "system", "content": "You are a math tutor. Show your steps."},
        {"role": "user", "content": "What is the derivative of x^2 * sin(x)?"},
        {"role": "assistant", "content": "Use the product rule (uv)' = u'v + uv' with u = x^2 and v = sin(x): "
         "u' = 2x and v' = cos(x). So the derivative is 2x sin(x) + x^2 cos(x)."},
    ],
]
