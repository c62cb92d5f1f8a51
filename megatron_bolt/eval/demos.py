"""Bundled few-shot demonstrations, written for this project (nothing is downloaded at evaluation time).

Each demonstration is a problem, the latent thought a model should write before answering (concise
declarative working, like the warm-start latents of bolt-method.md) and the final answer as the grader
expects it (LaTeX for MATH, a bare number for GSM8K). ``eval.fewshot_path`` replaces them.
"""

from __future__ import annotations

MATH = (
    {
        "problem": "Solve for $x$: $3x - 7 = 11$.",
        "latent": "Adding 7 to both sides gives 3x = 18. Dividing both sides by 3 gives x = 6.",
        "answer": "6",
    },
    {
        "problem": "What is the sum of the interior angles of a hexagon, in degrees?",
        "latent": "The interior angles of a polygon with n sides add up to (n - 2) * 180 degrees. "
                  "A hexagon has 6 sides, so the sum is 4 * 180 = 720 degrees.",
        "answer": "720",
    },
    {
        "problem": "Write $\\frac{12}{18} + \\frac{1}{6}$ as a fraction in lowest terms.",
        "latent": "Dividing numerator and denominator by 6 turns 12/18 into 2/3, which is 4/6. "
                  "Then 4/6 + 1/6 = 5/6, and 5 and 6 share no factor.",
        "answer": "\\frac{5}{6}",
    },
    {
        "problem": "Find the smaller root of $x^2 + 2x - 15 = 0$.",
        "latent": "Two numbers with product -15 and sum 2 are 5 and -3, so the quadratic factors as "
                  "(x + 5)(x - 3) = 0. The roots are -5 and 3; the smaller is -5.",
        "answer": "-5",
    },
    {
        "problem": "How many positive divisors does $72$ have?",
        "latent": "72 = 2^3 * 3^2. A divisor picks an exponent 0..3 for 2 and 0..2 for 3, "
                  "so there are (3 + 1)(2 + 1) = 12 divisors.",
        "answer": "12",
    },
)

GSM8K = (
    {
        "problem": "A baker makes 14 loaves in the morning and 9 in the afternoon. She sells 17 of them. "
                   "How many loaves are left?",
        "latent": "She makes 14 + 9 = 23 loaves. After selling 17, 23 - 17 = 6 remain.",
        "answer": "6",
    },
    {
        "problem": "Tickets cost $8 each. A class of 27 students and 3 teachers goes to the museum. "
                   "How much do the tickets cost in total?",
        "latent": "There are 27 + 3 = 30 people. At $8 each the tickets cost 30 * 8 = $240.",
        "answer": "240",
    },
    {
        "problem": "Omar reads 12 pages a day. His book has 180 pages. How many days does he need to finish it?",
        "latent": "At 12 pages a day, 180 pages take 180 / 12 = 15 days.",
        "answer": "15",
    },
    {
        "problem": "A jacket costs $60 and is on sale for 25% off. What is the sale price in dollars?",
        "latent": "25% of $60 is 0.25 * 60 = $15. The sale price is 60 - 15 = $45.",
        "answer": "45",
    },
    {
        "problem": "Lena has twice as many stickers as Ben, and Ben has 7 more than Cara. Cara has 5 stickers. "
                   "How many stickers do the three have together?",
        "latent": "Ben has 5 + 7 = 12 stickers and Lena has 2 * 12 = 24. Together 5 + 12 + 24 = 41.",
        "answer": "41",
    },
    {
        "problem": "A tank holds 1,200 liters. It is filled at 40 liters per minute starting from empty. "
                   "How many minutes until it is three quarters full?",
        "latent": "Three quarters of 1,200 liters is 900 liters. At 40 liters per minute that takes "
                  "900 / 40 = 22.5 minutes.",
        "answer": "22.5",
    },
    {
        "problem": "A store had 350 apples. It sold 128 on Monday and received a delivery of 75 on Tuesday. "
                   "How many apples does it have now?",
        "latent": "After Monday 350 - 128 = 222 apples remain. The delivery brings this to 222 + 75 = 297.",
        "answer": "297",
    },
    {
        "problem": "The temperature was 4 degrees at noon and fell 3 degrees every hour. "
                   "What was the temperature 5 hours later?",
        "latent": "In 5 hours it fell 5 * 3 = 15 degrees, so the temperature was 4 - 15 = -11 degrees.",
        "answer": "-11",
    },
)
