/* A float32 GRU (torch.nn.GRU's equations, gates r, z, n) of two layers, for the instruction
   count of one step next to the embedded eGRU's: the same layer sizes, random weights in flash
   (the count hardly depends on their values). float_gru_weights.h, written by
   benchmarks/mcu.py, defines INPUT, HIDDEN0, HIDDEN1, the weights and an input x; -DSTEPS=
   steps are run. */
#include <math.h>
#include <stdint.h>

#include "float_gru_weights.h"

#define MAX_H (HIDDEN0 > HIDDEN1 ? HIDDEN0 : HIDDEN1)

static float h0[HIDDEN0], h1[HIDDEN1];

static float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

static void gru_step(const float *w_ih, const float *w_hh, const float *b, int inputs, int hidden,
                     const float *in, float *h) {
    float gi[3 * MAX_H], gh[3 * MAX_H];
    int g, k;
    for (g = 0; g < 3 * hidden; g++) {
        float a = b[g], c = b[3 * hidden + g];
        for (k = 0; k < inputs; k++) a += w_ih[g * inputs + k] * in[k];
        for (k = 0; k < hidden; k++) c += w_hh[g * hidden + k] * h[k];
        gi[g] = a;
        gh[g] = c;
    }
    for (k = 0; k < hidden; k++) {
        float r = sigmoid(gi[k] + gh[k]);
        float z = sigmoid(gi[hidden + k] + gh[hidden + k]);
        float n = tanhf(gi[2 * hidden + k] + r * gh[2 * hidden + k]);
        h[k] = (1.0f - z) * n + z * h[k];
    }
}

static volatile int steps = STEPS; /* volatile: the same code for every count */

int main(void) {
    int t;
    for (t = 0; t < steps; t++) {
        gru_step(w_ih0, w_hh0, b0, INPUT, HIDDEN0, x, h0);
        gru_step(w_ih1, w_hh1, b1, HIDDEN0, HIDDEN1, h0, h1);
    }
    return h1[0] != h1[0]; /* uses the result; 1 only for a NaN */
}
