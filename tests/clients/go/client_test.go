// Calls a running `clm up` through Go stubs generated from proto/ with
// Debian's packaged toolchain (protoc, protoc-gen-go, protoc-gen-go-grpc,
// grpc-go and genproto from /usr/share/gocode): a customer is created, a
// touchpoint recorded, its score read, its segment membership checked, and
// a bad request comes back INVALID_ARGUMENT with its BadRequest decoded.
// run.sh generates the stubs into a GOPATH and runs `go test` here.
package clmclient

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"testing"
	"time"

	customerpb "clm.dev/gen/clm/customer/v1/customer"
	customerservicepb "clm.dev/gen/clm/customer/v1/customer_service"
	scoringpb "clm.dev/gen/clm/scoring/v1/scoring"
	scoringservicepb "clm.dev/gen/clm/scoring/v1/scoring_service"
	segmentationservicepb "clm.dev/gen/clm/segmentation/v1/segmentation_service"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func dial(t *testing.T, env string) *grpc.ClientConn {
	addr := os.Getenv(env)
	if addr == "" {
		t.Fatalf("%s is not set (run.sh sets it to the address clm up printed)", env)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, addr, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// eventually retries check until it returns true: scoring and segmentation
// follow the customer service's change stream, so they see a touchpoint a
// moment after it is recorded.
func eventually(t *testing.T, what string, check func() (bool, error)) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok, err := check()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not in time (last error: %v)", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func call() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 10*time.Second)
}

func TestScoredTouchpointPutsTheCustomerInASegment(t *testing.T) {
	customers := customerservicepb.NewCustomerServiceClient(dial(t, "CLM_CUSTOMER_ADDR"))
	scoring := scoringservicepb.NewScoringServiceClient(dial(t, "CLM_SCORING_ADDR"))
	segments := segmentationservicepb.NewSegmentationServiceClient(dial(t, "CLM_SEGMENTATION_ADDR"))
	tag := fmt.Sprintf("%08x", rand.New(rand.NewSource(time.Now().UnixNano())).Uint32())
	ctx, cancel := call()
	defer cancel()

	model, err := scoring.CreateScoringModel(ctx, &scoringservicepb.CreateScoringModelRequest{
		ScoringModelId: "go-" + tag,
		ScoringModel: &scoringpb.ScoringModel{
			DisplayName: "Go leads",
			Rules: []*scoringpb.ScoringRule{{
				Id: "exports", Score: "engagement", Points: 10,
				Trigger: &scoringpb.ScoringRule_Touchpoint{Touchpoint: `feature_use where feature = "export"`},
			}},
		},
		RequestId: "go-model-" + tag,
	})
	if err != nil {
		t.Fatalf("CreateScoringModel: %v", err)
	}
	segment, err := segments.CreateSegment(ctx, &segmentationservicepb.CreateSegmentRequest{
		Segment: &segmentationservicepb.Segment{
			DisplayName: "Go engaged " + tag, Owner: "growth", RuleText: `score("go-` + tag + `").engagement >= 10`,
		},
		RequestId: "go-segment-" + tag,
	})
	if err != nil {
		t.Fatalf("CreateSegment: %v", err)
	}
	customer, err := customers.CreateCustomer(ctx, &customerservicepb.CreateCustomerRequest{
		Customer:  &customerpb.Customer{Email: "go-" + tag + "@example.com", DisplayName: "Go"},
		RequestId: "go-customer-" + tag,
	})
	if err != nil {
		t.Fatalf("CreateCustomer: %v", err)
	}
	if _, err := customers.RecordTouchpoints(ctx, &customerservicepb.RecordTouchpointsRequest{
		Touchpoints: []*customerpb.Touchpoint{{
			Customer: customer.Name, EventId: "go-export-" + tag,
			Type: customerpb.TouchpointType_TOUCHPOINT_TYPE_FEATURE_USE, Feature: "export",
			OccurredTime: timestamppb.Now(),
		}},
	}); err != nil {
		t.Fatalf("RecordTouchpoints: %v", err)
	}

	eventually(t, "engagement score 10", func() (bool, error) {
		ctx, cancel := call()
		defer cancel()
		scores, err := scoring.GetScore(ctx, &scoringservicepb.GetScoreRequest{
			Customer: customer.Name, ScoringModel: model.Name,
		})
		if err != nil {
			return false, err
		}
		for _, s := range scores.Scores {
			if s.Score == "engagement" && s.Value == 10 {
				return true, nil
			}
		}
		return false, fmt.Errorf("scores %v", scores.Scores)
	})
	eventually(t, "segment membership", func() (bool, error) {
		ctx, cancel := call()
		defer cancel()
		m, err := segments.IsMember(ctx, &segmentationservicepb.IsMemberRequest{
			Segment: segment.Name, Customer: customer.Name,
		})
		return err == nil && m.Member, err
	})
}

func TestABadRequestNamesTheFieldInABadRequestDetail(t *testing.T) {
	customers := customerservicepb.NewCustomerServiceClient(dial(t, "CLM_CUSTOMER_ADDR"))
	ctx, cancel := call()
	defer cancel()
	_, err := customers.CreateCustomer(ctx, &customerservicepb.CreateCustomerRequest{
		Customer: &customerpb.Customer{Email: "not-an-email"},
	})
	st, _ := status.FromError(err)
	if st.Code() != codes.InvalidArgument {
		t.Fatalf("want INVALID_ARGUMENT, got %v", err)
	}
	var fields []string
	for _, d := range st.Details() {
		if bad, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range bad.FieldViolations {
				fields = append(fields, v.Field)
			}
		}
	}
	if len(fields) == 0 || fields[0] != "customer.email" {
		t.Fatalf("want a BadRequest naming customer.email, got %v (details %v)", fields, st.Details())
	}
}
