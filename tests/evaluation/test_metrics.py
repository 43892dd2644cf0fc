import math

import pytest
import torch

from squeezekv.evaluation import metrics


def test_qa_f1_normalises_and_counts_word_overlap():
    assert metrics.qa_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    # prediction "paris in france" vs answer "paris": precision 1/3, recall 1 -> F1 = 0.5
    assert metrics.qa_f1("Paris, in France.", "Paris") == pytest.approx(0.5)
    assert metrics.qa_f1("London", "Paris") == 0.0
    assert metrics.best_of(metrics.qa_f1, "Paris", ["Lyon", "paris"]) == 1.0


def test_rouge_l_is_the_lcs_f_measure():
    # LCS of "the cat sat on the mat" and "the cat lay on the mat" has 5 words: P = R = 5/6
    assert metrics.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert metrics.rouge_l("", "anything") == 0.0


def test_classification_shares_credit_among_named_classes():
    classes = ["location", "other location", "person"]
    assert metrics.classification("person", "person", classes) == 1.0
    assert metrics.classification("person or location", "person", classes) == 0.5
    # "location" inside the right label "other location" does not count against it
    assert metrics.classification("other location", "other location", classes) == 1.0
    assert metrics.classification("nothing", "person", classes) == 0.0


def test_retrieval_and_count_share_of_right_numbers():
    assert metrics.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert metrics.retrieval("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert metrics.retrieval("no idea", "Paragraph 3") == 0.0
    assert metrics.count("there are 4, not 5 or 6", "4") == pytest.approx(1 / 3)


def test_code_similarity_uses_the_first_code_line():
    assert metrics.code_similarity("```\n# a comment\nx = f(1)\ny = 2", "x = f(1)") == 1.0
    # "abcd" vs "abce": 3 of 4 characters match in each -> ratio 2*3/8 = 0.75
    assert metrics.code_similarity("abcd", "abce") == pytest.approx(0.75)


def test_perplexity_nll_and_kl_by_hand():
    assert metrics.perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert metrics.token_nll(logits, torch.tensor([1])).item() == pytest.approx(math.log(4))
    other = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert metrics.kl_divergence(logits, other).item() == pytest.approx(expected)
    assert metrics.kl_divergence(logits, logits).item() == 0.0
    with pytest.raises(ValueError):
        metrics.perplexity([])


def test_paired_bootstrap_interval():
    same = metrics.paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (same.difference, same.low, same.high, same.decided) == (0.0, 0.0, 0.0, False)
    better = [0.5 + 0.01 * i for i in range(50)]
    shifted = metrics.paired_bootstrap(better, [b - 0.1 for b in better])
    assert shifted.difference == pytest.approx(0.1) and shifted.decided
    noisy = metrics.paired_bootstrap([1.0, 0.0] * 10, [0.0, 1.0] * 10)
    assert noisy.low < 0 < noisy.high and not noisy.decided
    assert metrics.paired_bootstrap([1.0, 0.0] * 10, [0.0, 1.0] * 10, seed=0) == noisy  # fixed seed
    # weighted means through a transform: perplexity from token-weighted NLLs
    ppl = metrics.paired_bootstrap([1.0, 2.0], [1.0, 1.0], weights=[1, 3], statistic=lambda a, b: a - b)
    assert ppl.difference == pytest.approx(0.75)
    with pytest.raises(ValueError, match="equal, non-empty"):
        metrics.paired_bootstrap([1.0], [1.0, 2.0])
