/* Included once per element type T with FN naming its functions, by step_kernels.h and by
 * tensors.cpp: the one loop of the batch accuracy, whichever module calls it. */

/* The batch's top-1 accuracy as torch's (logits.argmax(1) == target).float().mean(): a row's
 * prediction is its first largest logit, a NaN counting as largest; the share in float (NaN for
 * no rows). Rows are `ld` elements apart. */
float FN(np_accuracy_)(int64_t rows, int64_t classes, const T *logits, int64_t ld,
                       const int64_t *target) {
    int64_t correct = 0;
    for (int64_t r = 0; r < rows; r++) {
        const T *x = logits + r * ld;
        int64_t top = 0;
        for (int64_t c = 1; c < classes && x[top] == x[top]; c++)
            if (x[c] > x[top] || x[c] != x[c]) top = c;
        correct += top == target[r];
    }
    return (float)correct / (float)rows;
}
