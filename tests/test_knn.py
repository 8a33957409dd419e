import torch

from maeframe.engine.knn import knn_accuracy, knn_scores


def test_knn_on_a_toy_set_with_a_known_answer():
    # class 0 points along +x, class 1 along +y; queries near each axis
    train = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.9, -0.1], [0.0, 1.0], [0.1, 3.0], [-0.1, 0.8]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    queries = torch.tensor([[5.0, 0.2], [0.3, 4.0]])
    scores = knn_scores(train, labels, queries, k=3, temperature=0.07)
    assert scores.argmax(1).tolist() == [0, 1]
    assert knn_accuracy(train, labels, queries, torch.tensor([0, 1]), k=3) == 1.0


def test_votes_are_similarity_weighted():
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])  # one very close class-0, two farther class-1
    labels = torch.tensor([0, 1, 1])
    scores = knn_scores(train, labels, torch.tensor([[1.0, 0.0]]), k=3, temperature=0.07)
    expected0 = torch.exp(torch.tensor(1.0 / 0.07))
    expected1 = 2 * torch.exp(torch.tensor(0.6 / 0.07))
    assert torch.allclose(scores[0], torch.stack([expected0, expected1]))
    assert scores.argmax().item() == 0
